"""One module per stage of a QPO run (Step 0, the expert filter, augmentation, training,
the test phase), each with ``run(ctx, stage)`` and ``log(ctx, stage, outputs)``; their order
is qpo_ray.run.pipeline, the context they share is `context.RunContext`."""
