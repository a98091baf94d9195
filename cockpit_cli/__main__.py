"""Allow ``python -m cockpit_cli``."""

from cockpit_cli.cli import main

if __name__ == "__main__":
    main()
