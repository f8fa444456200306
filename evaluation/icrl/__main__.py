"""``python -m evaluation.icrl ...`` runs ``evaluation.icrl.run``."""

from evaluation.icrl.run import main

if __name__ == "__main__":
    main()
