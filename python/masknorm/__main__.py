"""python -m masknorm: the demo (python -m masknorm.demo); --help lists its options."""
from .demo import main

if __name__ == "__main__":
    main(prog="python -m masknorm")
