"""Post-training feeds: SFT conversations, GRPO rollouts, DPO pairs and co-evolution's data re-scoring."""
