"""ALFWorld SFT data: the expert with random actions, negative examples, rule or API reflections."""
