"""Launch: data preparation (launch.data), the training entry point (launch/train.py), the quick
start and multi-node scripts."""
