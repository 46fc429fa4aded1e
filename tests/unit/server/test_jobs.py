"""Job definitions: cron times, retention policies and specs are checked before anything is stored."""

from __future__ import annotations

import datetime

import pytest

from hozon.errors import UsageError
from hozon.repo.retention import Duration, Retention
from hozon.server.jobs import check_schedule, next_time, retention_policy
from hozon.server.runs import describe_owner, one_line


def test_next_time_is_the_schedules_next_local_time_in_utc() -> None:
    after = datetime.datetime(2026, 12, 7, 22, 0, 30, tzinfo=datetime.UTC)
    nxt = next_time("*/15 * * * *", after)
    assert nxt.tzinfo == datetime.UTC and nxt > after
    assert nxt - after <= datetime.timedelta(minutes=15) and nxt.astimezone().minute % 15 == 0
    assert next_time("* * * * * */10", after) == after.replace(second=40)  # a sixth field: seconds


@pytest.mark.parametrize("expression", ["61 * * * *", "* * *", "every day", "0 25 * * *"])
def test_a_bad_cron_expression_is_one_sentence(expression: str) -> None:
    with pytest.raises(UsageError, match="is not a valid cron expression"):
        check_schedule(expression)


def test_check_schedule_normalises_spaces() -> None:
    assert check_schedule("  30   2 * *  * ") == "30 2 * * *"


def test_retention_policy_from_json() -> None:
    assert retention_policy({"last": 3, "daily": 7, "within": "14d"}) == Retention(
        last=3, daily=7, within=Duration(days=14))
    assert retention_policy({}).empty
    for bad, words in (({"last": -1}, "0 or more"), ({"last": "3"}, "whole number"), ({"last": True}, "whole number"),
                       ({"forever": 1}, "unknown retention rule"), ({"within": "2 weeks"}, "not a duration")):
        with pytest.raises(UsageError, match=words):
            retention_policy(bad)


def test_reasons_are_one_line_and_holders_read_well() -> None:
    assert one_line("disk\nfull \t now") == "disk full now"
    assert len(one_line("x" * 5000)) == 1000
    assert describe_owner("agent:web1") == "agent web1"
    assert describe_owner("server:backup1:4242") == "server process backup1:4242"
