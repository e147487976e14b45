"""``python -m mist.cloud`` is ``mist-cloud``."""

from .cli import main

if __name__ == "__main__":
    main()
