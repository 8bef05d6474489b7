"""Training stages of the InstructGPT recipe on the rlhf_fast ops: pretrain -> SFT -> reward model -> PPO-ptx.

Run them with ``rlhf-fast pipeline`` (see rlhf_fast/cli.py); each stage is a module with ``train(cfg, out, resume)``.
"""
