"""Training the policy on Ray Train: the engine base (`engine`), DDP (`trainer`), DeepSpeed
ZeRO (`deepspeed_engine`) and one loop's schedule (`loop.train_loop`)."""
