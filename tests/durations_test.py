"""The slow-test list: parsed from pytest's --durations report, updated by
what a run measured, kept for what it did not run."""

from tests import durations

REPORT = """
============================== slowest durations ===============================
1.50s call     tests/a_test.py::test_one[x]
0.70s setup    tests/a_test.py::test_one[x]
0.01s teardown tests/a_test.py::test_one[x]
1.20s call     tests/a_test.py::test_two
3.00s call     tests/b_test.py::test_three
(12 durations < 0.005s hidden.  Use -vv to show these durations.)
"""


def test_setup_call_and_teardown_are_summed_per_test():
  seconds = durations.measured(REPORT)
  assert seconds.keys() == {
    'tests/a_test.py::test_one[x]',
    'tests/a_test.py::test_two',
    'tests/b_test.py::test_three',
  }
  assert abs(seconds['tests/a_test.py::test_one[x]'] - 2.21) < 1e-9


def test_a_measured_test_is_listed_or_dropped_and_an_unmeasured_one_kept():
  listed = {'tests/a_test.py::test_two': 5.0, 'tests/c_test.py::test_four': 9.0}
  assert durations.updated(listed, REPORT) == {
    'tests/a_test.py::test_one[x]': 2.21,  # 2.21 s >= SLOW_SECONDS: listed
    'tests/b_test.py::test_three': 3.0,
    'tests/c_test.py::test_four': 9.0,  # not run by this report: kept
  }  # a_test.py::test_two measured 1.2 s: dropped


def test_the_list_round_trips(tmp_path):
  path = tmp_path / 'slow.txt'
  durations.write_list({'tests/b_test.py::t': 3.04, 'tests/a_test.py::t[1]': 2.0}, path)
  assert path.read_text() == '2.0 tests/a_test.py::t[1]\n3.0 tests/b_test.py::t\n'
  assert durations.read_list(path) == {
    'tests/a_test.py::t[1]': 2.0,
    'tests/b_test.py::t': 3.0,
  }
