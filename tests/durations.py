"""The tests `make test-fast` leaves to `make test` because they are slow.

``tests/slow_tests.txt`` lists, one per line as ``SECONDS NODE_ID``, every
test measured to take at least ``SLOW_SECONDS`` (setup, call and teardown
together, 2 pytest-xdist workers on a 2-core CPU, the CI's shape);
``conftest.py`` marks them ``slow``. Tests marked ``slow`` in their source
(the real-model runs) are ``slow`` whatever they measure.

Refresh the list from a run's report::

  pytest -n auto --durations=0 -q | tee /tmp/run.log
  python -m tests.durations /tmp/run.log

A test the report measured is listed, or dropped, by that measurement; a
test it did not run (deselected, or removed) keeps its line, so a fast run's
report updates the fast tests and leaves the slow ones listed.
"""

import collections
import pathlib
import re
import sys

SLOW_SECONDS = 2.0
LIST = pathlib.Path(__file__).with_name('slow_tests.txt')
# A line of pytest's --durations report: "1.23s call     tests/x_test.py::t[p]".
REPORT_LINE = re.compile(r'^(\d+(?:\.\d+)?)s (?:setup|call|teardown)\s+(\S+)$')


def read_list(path: pathlib.Path = LIST) -> dict[str, float]:
  """``{node_id: seconds}`` of the listed slow tests."""
  if not path.exists():
    return {}
  rows = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line)
  return {node_id: float(seconds) for seconds, node_id in rows}


def measured(report: str) -> dict[str, float]:
  """``{node_id: seconds}``: each test's setup, call and teardown summed."""
  seconds: dict[str, float] = collections.defaultdict(float)
  for line in report.splitlines():
    match = REPORT_LINE.match(line.strip())
    if match:
      seconds[match.group(2)] += float(match.group(1))
  return dict(seconds)


def updated(listed: dict[str, float], report: str) -> dict[str, float]:
  """``listed`` with every test the report measured listed or dropped by
  its measurement."""
  new = measured(report)
  kept = {node_id: s for node_id, s in listed.items() if node_id not in new}
  return {**kept, **{node_id: s for node_id, s in new.items() if s >= SLOW_SECONDS}}


def write_list(slow: dict[str, float], path: pathlib.Path = LIST) -> None:
  path.write_text(
    ''.join(f'{s:.1f} {node_id}\n' for node_id, s in sorted(slow.items()))
  )


def main(argv: list[str]) -> int:
  if not argv:
    print('usage: python -m tests.durations REPORT...', file=sys.stderr)
    return 2
  slow = read_list()
  for name in argv:
    slow = updated(slow, pathlib.Path(name).read_text())
  write_list(slow)
  print(f'{len(slow)} tests at >= {SLOW_SECONDS} s in {LIST}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
