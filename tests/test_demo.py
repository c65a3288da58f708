"""The demo's login window: long enough for the steps this machine takes."""

from sapd_nfq.lab.demo import WINDOW_RUNS, WINDOW_SLACK, login_window


def test_a_fast_machine_keeps_the_chosen_window():
    assert login_window(0.3, 10) == 10


def test_slow_steps_widen_the_window_to_hold_the_login_and_the_relay():
    # five-second SMTP sessions (a resolver timeout each) need more than the default 10 s
    window = login_window(5.0, 10)
    assert window >= WINDOW_RUNS * 5.0 + WINDOW_SLACK
    assert window == 17
