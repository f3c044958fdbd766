"""benchmarks/timing.py: the steps' order and counts when they take turns."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       'benchmarks'))
import timing  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_steps_take_turns_with_an_untimed_step_at_each_switch():
  calls = []
  steps = {name: (lambda name=name: calls.append(name)) for name in 'ab'}
  timed, rounds = timing.taking_turns(steps, warmup=1, timed=5, per_turn=2)
  # warm-up, then rounds of (switch + 2 timed) each; the last round has 1.
  assert ''.join(calls) == 'ab' + 'aaabbb' * 2 + 'aabb'
  assert [len(timed[n][1]) for n in 'ab'] == [5, 5]
  assert len(rounds) == 3 and all(set(r) == {'a', 'b'} for r in rounds)
  median, times, host, switches = timed['a']
  assert median >= 0 and sorted(times)[2] == median and len(switches) == 3
  assert host['sys_s_per_step'] >= 0 and host['page_faults_per_step'] >= 0


def test_a_step_alone_takes_no_untimed_switch_steps():
  calls = []
  timed, rounds = timing.taking_turns({'a': lambda: calls.append(1)}, 2, 5)
  assert len(calls) == 7 and len(rounds) == 3 and timed['a'][3] == []


def test_median_step_times_after_warmup():
  calls = []
  median, times, _ = timing.median_step(lambda: calls.append(1), 2, 3)
  assert len(calls) == 5 and len(times) == 3 and median == sorted(times)[1]

