"""stackllama: the StackLlama RLHF recipe (SFT -> reward model -> PPO) as a Hydra app."""

__version__ = "0.1.0"
