"""DangerousTaxi SFT data: oracle + random trajectories, negative examples, reflections."""
