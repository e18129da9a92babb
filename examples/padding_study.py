"""The padding study: stock BatchNorm1d vs MaskedBatchNorm1d vs LayerNorm on padded batches.

    python examples/padding_study.py            # default setting, about 3 minutes on 2 CPU cores
    python examples/padding_study.py --quick    # seconds, a smoke test
    python examples/padding_study.py --help

Same as ``python -m masknorm.study`` (and ``python -m masknorm.demo --study``);
writes masknorm_results/study/ in the current folder (``--out docs/study``
rewrites the committed report); needs matplotlib and tqdm
(``pip install "masknorm[study]"``).
"""
from masknorm.study import main

if __name__ == "__main__":
    main(prog="python examples/padding_study.py")
