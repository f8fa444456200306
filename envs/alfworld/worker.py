"""The engine worker's entry point: ``python -m envs.alfworld.worker READ_FD WRITE_FD`` (see engine.py)."""

from envs.alfworld.engine import main

if __name__ == "__main__":
    main()
