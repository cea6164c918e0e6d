"""`python -m flowers.cli ...` runs the command line."""
from flowers.cli.main import entry

if __name__ == "__main__":
    entry()
