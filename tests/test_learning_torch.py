"""reppo_torch.py learns: CartpoleBalance through the JAX bridge, with the CPU setting, beats
an untrained policy; the same seed and threshold as the JAX file's test, and its budget until
session 22 (409,600 env steps; the JAX test's is now 491,520, see there). Session 22's CI, on an
AMD EPYC (Zen 4) VM, passed this test at this budget, so it was left as it is: there seed 1's only
evaluation above 400 is 428 at 327,680 steps, the same to the digit in every run (session 23), and
continuing to 491,520 steps adds none (docs/results.md).

The untrained deterministic policy of seed 1 scores ~224; evaluation returns then climb,
noisily, past 400. Measured for seed 1: 437 at 287k env steps (2 threads, AMD EPYC VM);
541 at 266k (one thread, as under the suite's `-n 2`, tests/conftest.py; AMD, session 9);
425 at 369k and 505 at 389k (one thread, Intel Xeon VM, session 12). Thread count and CPU
change the floating-point sums and so the curve. Broken learners do not get there (session 13,
seed 1, one thread, Intel, the same run): with --learning-rate 0 the best evaluation after step 0
was 210, with the actor ascending -Q instead of Q (the sign of Q flipped in actor_loss) 310; both
ended near 150 (docs/results.md).

At this budget the curve is near the onset of learning, so the margin is modest: session 12,
seeds 1-8 with one thread each on the Intel VM (`--preset cpu --total-timesteps 409600
--log-interval 10`), first evaluation above 400 at 369k, 389k, 410k, 246k, 184k, never (best
381), 307k and 410k env steps; by 328k (this test's budget until session 12) only 3 of the 8,
and seed 1 failed there in a clean-clone CI run (best 326). One such run took 4 min on one
Intel core (this test alone, two threads: 2 min 29 s).
"""

from conftest import cartpole_learning_run

THRESHOLD = 400.0
STEPS = 409_600  # 200 iterations of 64 envs x 32 steps, as in the JAX file's test


def test_cartpole_balance_learns_with_the_cpu_setting(tmp_path):
    rows, untrained, trained = cartpole_learning_run("reppo_torch.py", STEPS, tmp_path)
    assert int(rows[0]["global_step"]) == 0 and int(rows[-1]["global_step"]) == STEPS
    assert untrained < THRESHOLD, f"the untrained policy already scores {untrained}"
    assert max(trained) > THRESHOLD, f"best evaluation return {max(trained)} after {STEPS:,} steps: {trained}"
