"""Model loading, SFT, rollouts and online RL. Importing experiment_args first sets its logging filters
before torch, transformers and bitsandbytes are imported."""

import experiment_args  # noqa: F401
