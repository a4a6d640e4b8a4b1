"""The perf log writer's per-call records: exactly the JSON and the v2.4 row they stand for."""
import json

import pytest

from shmrt.tools.perflog import COLUMNS, LINE_WIDTH, ROW_PERCENT, WIDTHS, PerfLog, format_row, row_fields, throughput_mbps
from shmrt.wire.stats import CallStats


def test_call_record_is_the_json_of_its_fields():
    s = CallStats("BatchLinear", "shm", 3, 1000, 21000, 41000, 141000, 171000, 8264, 24712, 8192, 24576, 1234, 99, 0x31)
    line = PerfLog._call_record(7, 'dec"ode\\', s)
    expected = {"type": "call", "id": 7, "method": "BatchLinear", "layer": 3, "op": 0x31, "phase": 'dec"ode\\',
                "transport": "shm", "t_start_ns": 1000, "t_encoded_ns": 21000, "t_sent_ns": 41000,
                "t_replied_ns": 141000, "t_decoded_ns": 171000, "sent_bytes": 8264, "recv_bytes": 24712,
                "payload_sent": 8192, "payload_recv": 24576, "copy_in_ns": 1234, "daemon_work_ns": 99}
    assert line == json.dumps(expected, separators=(",", ":")) + "\n"


def test_rows_pad_every_field_to_its_column():
    fields = row_fields(12, "AttentionOutput", 0.0125, 0.02, 1.5, 0.031, 1.5635, 8264, 24712)
    assert format_row(fields) == " ".join(str(f).ljust(w) for f, w in zip(fields, WIDTHS))
    assert len(format_row(fields)) == len(format_row(COLUMNS)) == LINE_WIDTH


@pytest.mark.parametrize("values", [(12, "AttentionOutput", 0.0125, 0.02, 1.5, 0.031, 1.5635, 8264, 24712),
                                    (99999, "LMHead", 123456.789, 0.0, 0.0004, 2.5e-7, 0.0, 0, 0),
                                    (100000, "BatchLinear", -0.001, float("nan"), float("inf"), 1e12, 7.0, 2**40, 3)])
def test_the_one_format_row_writes_what_the_field_by_field_format_writes(values):
    call_id, method, ser, send, recv, deser, total, sent, received = values
    fast = ROW_PERCENT % (call_id, method, ser, send, recv, deser, total, sent / 1024, received / 1024,
                          throughput_mbps(sent, received, total))
    assert fast == format_row(row_fields(*values))


def test_rows_are_formatted_while_waiting_and_written_in_batches(tmp_path):
    log = PerfLog(str(tmp_path / "p.log"), "SHM+IPC", {})
    s = CallStats("BatchLinear", "shm", 3, 1000, 21000, 41000, 141000, 171000, 8264, 24712, 8192, 24576, 1234, 99, 0x31)
    log(s)
    log.idle()     # formatted, not written: the file still has only its header
    assert log._pending == [] and len(log._rows) == 1
    assert "BatchLinear" not in (tmp_path / "p.log").read_text()
    log(s)
    log.close()    # the formatted row and the unformatted one, in order
    rows = [line for line in (tmp_path / "p.log").read_text().splitlines() if "BatchLinear" in line]
    assert [line.split()[0] for line in rows] == ["1", "2"]
    side = [json.loads(line) for line in (tmp_path / "p.log.jsonl").read_text().splitlines()]
    assert [r["id"] for r in side if r["type"] == "call"] == [1, 2]
