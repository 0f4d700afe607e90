"""``python -m fed_essam [overrides]``: the same as the ``fed-essam`` command."""

from fed_essam.cli import main

if __name__ == "__main__":
    main()
