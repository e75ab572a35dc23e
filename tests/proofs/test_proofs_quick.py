"""The shortened proofs for `make test`: the steps of
fashion_mnist_proofs.py on 100 images per class and split, one or two
epochs each; the transfer claim (trained backbone clearly better than a
random one) is checked, the fine-tune accuracy only loosely."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_mnist_proofs  # noqa: E402

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "--quick"]
    sys.exit(fashion_mnist_proofs.main())
