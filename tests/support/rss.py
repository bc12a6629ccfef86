"""The memory tests' check of `plan`'s prediction against the peak the OS counted.

The prediction is a promise: never below the measured peak, and within 10% of it, in a freshly installed venv and
in one whose library files were long since evicted and read back (the same numpy maps 15 MiB or 11.4 there;
`convert` measures its import, runs/mapping.py, so the prediction follows).
"""


def assert_within_prediction(report: dict, within: float = 0.10) -> None:
    """`report` (`convert --json`): its peak RSS at most the predicted peak, and at most `within` below it."""
    peak, predicted = report["peak_rss_bytes"], report["predicted_peak_bytes"]
    assert peak <= predicted, f"measured {peak / 2**20:.1f} MiB above the predicted {predicted / 2**20:.1f} MiB"
    assert predicted - peak <= peak * within, (
        f"predicted {predicted / 2**20:.1f} MiB, more than {within:.0%} above the measured {peak / 2**20:.1f} MiB")
