"""`python -m stackllama ...` runs the Hydra entry point."""

from stackllama.train import main

if __name__ == "__main__":
    main()
