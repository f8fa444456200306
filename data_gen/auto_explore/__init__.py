"""AutoExplore SFT data: expert and noisy trajectories, negative examples, rule or API reflections."""
