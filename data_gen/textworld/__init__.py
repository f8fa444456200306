"""TextWorld SFT data: the replanned walkthrough with random commands, negative examples, rule or API reflections."""
