"""streamconv's benchmark suite: a DCP checkpoint generator (`generate`), a harness that runs
streamconv beside cp -r and the usual baselines (`run`), and the pieces they share. See README.md."""
