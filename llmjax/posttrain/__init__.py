"""Post-training: supervised fine-tuning on chats, preference optimization (DPO, SimPO, ORPO) and RL with verifiable
rewards (GRPO)."""
