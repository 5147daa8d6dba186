"""Write a one-page summary of a run, finished, running or stopped: OUTPUT_DIR/report.md and plots.

    python report.py OUTPUT_DIR

train.py writes it at the end of every run; this script writes it on demand (utils/report.py).
"""

import argparse

from utils.errors import run_cli
from utils.report import write_report


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write OUTPUT_DIR/report.md and plots for a finished or running run.")
    parser.add_argument("output_dir", help="the run's --output_dir")
    args = parser.parse_args(argv)
    print(f"wrote {write_report(args.output_dir)}")


if __name__ == "__main__":
    run_cli(main)
