"""In-context RL baselines: Monea et al. (2024), "LLMs Are In-Context (Bandit) Reinforcement Learners".

``tasks`` loads the classification tasks, ``context`` picks past episodes, ``prompts`` writes the chat
messages, and ``run`` is the online loop (``python -m evaluation.icrl --help``).
"""
