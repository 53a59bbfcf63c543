"""tuneop.dataset: format detection, line checks, normalisation, Together <-> TRL preference."""
from __future__ import annotations

import json
import pickle

import pytest

from tuneop import dataset as ds
from tuneop.dataset import (
    FORMATS,
    DatasetError,
    DatasetReport,
    LineError,
    check_file,
    check_lines,
    detect_format,
    normalize_row,
    read_rows,
    to_together_preference,
)


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


GOOD = {
    "messages": [
        {"messages": [S("be brief"), U("hi"), A("hello")]},
        {"messages": [U("2+2?"), A("4"), U("and 3+3?"), A("6")]},
    ],
    "prompt-completion": [
        {"prompt": "Translate: cat", "completion": " chat"},
        {"prompt": [S("sys"), U("q")], "completion": [A("a")]},
    ],
    "text": [{"text": "The quick brown fox."}, {"text": "jumps", "id": 7}],
    "preference": [
        {"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": [U("Sky colour?")], "chosen": [A("Blue.")], "rejected": [A("Green.")]},
        {
            "input": {"messages": [U("Sky colour?")]},
            "preferred_output": [A("Blue.")],
            "non_preferred_output": [A("Green.")],
        },
    ],
}


def jl(*rows) -> list[str]:
    return [r if isinstance(r, str) else json.dumps(r) for r in rows]


def write(tmp_path, lines, name="train.jsonl") -> str:
    p = tmp_path / name
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    p.write_bytes(data)
    return str(p)


def msgs(report: DatasetReport) -> list[tuple[int, str]]:
    return [(e.line, e.message) for e in report.errors]


# ---------------------------------------------------------------------------------------------
# good files of every format


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("declared", ["auto", "explicit"])
def test_good_file_each_format(tmp_path, fmt, declared):
    path = write(tmp_path, jl(*GOOD[fmt]))
    r = check_file(path, fmt if declared == "explicit" else "auto")
    assert r.ok, r.summary()
    assert r.format == fmt
    assert r.rows == len(GOOD[fmt])
    assert r.errors == [] and r.total_errors == 0
    assert r.estimated_tokens > 0
    assert r.source == path


def test_formats_constant():
    assert FORMATS == ("messages", "prompt-completion", "text", "preference")


@pytest.mark.parametrize(
    "row,fmt",
    [
        ({"messages": []}, "messages"),
        ({"text": "x", "meta": 1}, "text"),
        ({"prompt": "p", "completion": "c"}, "prompt-completion"),
        ({"completion": "c"}, "prompt-completion"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference"),
        ({"chosen": "a", "rejected": "b"}, "preference"),
        ({"input": {"messages": []}, "preferred_output": [], "non_preferred_output": []}, "preference"),
        # alpaca-style rows carry 'input' (a string) next to 'text': that is text, not Together
        ({"instruction": "i", "input": "", "output": "o", "text": "t"}, "text"),
        ({"prompt": "p"}, None),
        ({"question": "q", "answer": "a"}, None),
        ({"messages": [], "prompt": "p"}, None),
        ({"text": "t", "completion": "c", "prompt": "p"}, None),
        ({"prompt": "p", "completion": "c", "chosen": "a", "rejected": "b"}, None),
        ([1, 2], None),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


# ---------------------------------------------------------------------------------------------
# JSON / encoding / blank lines / line numbers


def test_blank_lines_skipped_and_line_numbers_physical(tmp_path):
    lines = ["", "   ", json.dumps(GOOD["text"][0]), "\t", "{oops", "", "[1, 2]", '"str"', "42", "null"]
    r = check_file(write(tmp_path, lines), max_errors=10)
    assert not r.ok
    assert r.rows == 6  # blank lines are not rows; invalid lines are
    assert [e.line for e in r.errors] == [5, 7, 8, 9, 10]
    assert r.errors[0].message.startswith("invalid JSON: ")
    assert "column 2" in r.errors[0].message
    assert r.errors[1].message == "expected a JSON object, got array"
    assert r.errors[2].message == "expected a JSON object, got string"
    assert r.errors[3].message == "expected a JSON object, got number"
    assert r.errors[4].message == "expected a JSON object, got null"


def test_crlf_and_bom_and_no_trailing_newline(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD["text"][0]).encode() + b"\r\n\r\n" + b'{"text": "b"}')
    r = check_file(p)
    assert r.ok, r.summary()
    assert r.rows == 2 and r.format == "text"


def test_invalid_utf8_has_line_number(tmp_path):
    lines = [json.dumps({"text": "fine"}).encode(), b'{"text": "caf\xe9"}', json.dumps({"text": "ok"}).encode()]
    r = check_file(write(tmp_path, lines))
    assert not r.ok
    assert r.rows == 3
    assert msgs(r) == [(2, "invalid UTF-8 (byte 0xe9 at column 14)")]


def test_valid_non_ascii_utf8(tmp_path):
    r = check_file(write(tmp_path, [json.dumps({"text": "café ☕ 日本"}, ensure_ascii=False)]))
    assert r.ok and r.rows == 1


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_no_rows(tmp_path, content):
    p = tmp_path / "empty.jsonl"
    p.write_text(content)
    r = check_file(p)
    assert not r.ok and r.rows == 0 and r.format is None
    assert msgs(r) == [(0, "no rows")]
    assert r.summary() == f"{p}: no rows"


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "train.jsonl"
    r = check_file(path)
    assert not r.ok and r.rows == 0
    assert len(r.errors) == 1 and r.errors[0].line == 0
    assert str(path) in r.errors[0].message
    assert "No such file" in r.errors[0].message
    with pytest.raises(DatasetError) as ei:
        read_rows(path)
    assert str(path) in str(ei.value)


def test_directory_is_unreadable(tmp_path):
    r = check_file(tmp_path)
    assert not r.ok and r.errors[0].line == 0 and str(tmp_path) in r.errors[0].message


# ---------------------------------------------------------------------------------------------
# per-format errors name the line and the field


BAD = [
    # messages
    ({"messages": "hi"}, "'messages' must be a non-empty list of messages, got string"),
    ({"messages": []}, "'messages' must be a non-empty list of messages, got an empty array"),
    ({"messages": [U("hi"), "x"]}, "messages[1]: expected a message object"),
    ({"messages": [U("hi"), {"content": "x"}]}, "messages[1]: missing 'role'"),
    ({"messages": [U("hi"), {"role": "assistant"}]}, "messages[1]: missing 'content'"),
    ({"messages": [U("hi"), {"role": "bot", "content": "x"}]}, 'messages[1].role: "bot" is not one of system, user, assistant'),
    ({"messages": [U("hi"), {"role": "assistant", "content": 5}]}, "messages[1].content must be a string, got number"),
    ({"messages": [U(""), A("x")]}, "messages[0].content is empty"),
    ({"messages": [U("hi"), A("  ")]}, "messages[1].content is empty"),
    ({"messages": [A("x")]}, "messages[0].role: expected 'user', got 'assistant'"),
    ({"messages": [U("a"), U("b"), A("c")]}, "messages[1].role: expected 'assistant', got 'user'"),
    ({"messages": [U("a"), A("b"), S("c"), U("d"), A("e")]}, "messages[2].role: 'system' is only allowed as the first message"),
    ({"messages": [S("a"), S("b"), U("c"), A("d")]}, "messages[1].role: 'system' is only allowed"),
    ({"messages": [S("a")]}, "'messages' has only a system message"),
    ({"messages": [U("a"), A("b"), U("c")]}, "messages: the last message must be from 'assistant', got 'user'"),
    # prompt-completion
    ({"prompt": "", "completion": "x"}, "'prompt' is empty"),
    ({"prompt": "p", "completion": " \n"}, "'completion' is empty"),
    ({"prompt": 3, "completion": "x"}, "'prompt' must be a string or a list of messages, got number"),
    ({"prompt": "p", "completion": 3}, "'completion' must be a string like 'prompt', got number"),
    ({"prompt": "p", "completion": [A("x")]}, "'completion' must be a string like 'prompt', got array"),
    ({"prompt": [U("p")], "completion": "x"}, "'completion' must be a list of assistant messages like 'prompt', got string"),
    ({"prompt": [U("p"), A("x")], "completion": [A("y")]}, "prompt: the last message must be from 'user', got 'assistant'"),
    ({"prompt": [U("p")], "completion": [U("y")]}, "completion[0].role must be 'assistant', got \"user\""),
    ({"completion": "x"}, "missing 'prompt'"),
    # text
    ({"text": ""}, "'text' is empty"),
    ({"text": "   "}, "'text' is empty"),
    ({"text": ["a"]}, "'text' must be a string, got array"),
    # preference (TRL)
    ({"chosen": "a", "rejected": "b"}, "missing 'prompt'"),
    ({"prompt": "p", "chosen": "a"}, "missing 'rejected'"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "p", "chosen": [A("a")], "rejected": "b"}, "'chosen' must be a string like 'prompt', got array"),
    ({"prompt": [U("p")], "chosen": [A("a")], "rejected": "b"}, "'rejected' must be a list of assistant messages like 'prompt', got string"),
    ({"prompt": [U("p")], "chosen": [A("a")], "rejected": [A("a")]}, "'chosen' and 'rejected' are identical"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a list of messages, got null"),
    # preference (Together)
    ({"preferred_output": [A("a")], "non_preferred_output": [A("b")]}, "missing 'input'"),
    ({"input": "x", "preferred_output": [A("a")], "non_preferred_output": [A("b")]}, "'input' must be an object with 'messages', got string"),
    ({"input": {}, "preferred_output": [A("a")], "non_preferred_output": [A("b")]}, "missing 'input.messages'"),
    ({"input": {"messages": [U("q")]}, "preferred_output": [A("a")]}, "missing 'non_preferred_output'"),
    ({"input": {"messages": [U("q")]}, "preferred_output": [A("a"), A("b")], "non_preferred_output": [A("c")]}, "'preferred_output' must hold exactly one assistant message, got 2"),
    ({"input": {"messages": [U("q")]}, "preferred_output": [U("a")], "non_preferred_output": [A("c")]}, "preferred_output[0].role must be 'assistant'"),
    ({"input": {"messages": [U("q")]}, "preferred_output": [A("a")], "non_preferred_output": [A("a")]}, "'preferred_output' and 'non_preferred_output' are identical"),
    ({"input": {"messages": [A("q")]}, "preferred_output": [A("a")], "non_preferred_output": [A("b")]}, "input.messages[0].role: expected 'user', got 'assistant'"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "preferred_output": [A("x")]}, "mixes TRL preference keys ('prompt', 'chosen' and 'rejected') and Together keys ('preferred_output')"),
]


@pytest.mark.parametrize("row,expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_row_names_line_and_field(row, expected):
    fmt = detect_format(row) or "preference"
    good = GOOD[fmt][0]
    lines = jl(good, "", good, row, good)  # bad row on physical line 4
    for declared in ("auto", fmt):
        r = check_lines(lines, declared)
        assert not r.ok
        assert r.rows == 4
        assert len(r.errors) == 1, r.errors
        assert r.errors[0].line == 4
        assert expected in r.errors[0].message, r.errors[0].message
        assert r.format == fmt
        with pytest.raises(ValueError, match=".") as ei:
            normalize_row(row, fmt)
        assert expected in str(ei.value)


def test_missing_keys_list_what_the_row_has():
    r = check_lines(jl({"text": "a"}, {"txt": "b", "id": 1}))
    assert msgs(r) == [(2, "missing 'text' (row has keys: 'txt', 'id')")]


def test_unrecognised_first_row_then_format_from_first_valid_row():
    r = check_lines(jl({"question": "q", "answer": "a"}, {"messages": [A("x")]}, {"text": "t"}, {"text": "u"}))
    assert r.format == "text"
    assert [e.line for e in r.errors] == [1, 2]
    assert r.errors[0].message.startswith("unrecognised row: expected 'messages', 'prompt'+'completion'")
    assert "'question', 'answer'" in r.errors[0].message


def test_extra_keys_ignored_and_dropped():
    row = {"messages": [{"role": "user", "content": "a", "name": "x"}, A("b")], "id": 1, "source": "web"}
    assert check_lines(jl(row)).ok
    assert normalize_row(row, "messages") == {"messages": [U("a"), A("b")]}


# ---------------------------------------------------------------------------------------------
# one format per file, declared vs detected, ambiguity


def test_mixed_formats_auto():
    lines = jl(GOOD["messages"][0], GOOD["text"][0], GOOD["messages"][1], GOOD["prompt-completion"][0])
    r = check_lines(lines)
    assert r.format == "messages"
    assert msgs(r) == [
        (2, "row looks like 'text' but the file is 'messages' (set by line 1)"),
        (4, "row looks like 'prompt-completion' but the file is 'messages' (set by line 1)"),
    ]
    assert r.rows == 4


def test_auto_first_valid_row_decides_even_after_invalid_rows():
    lines = jl("{bad", {"text": ""}, GOOD["preference"][0], {"text": "t"})
    r = check_lines(lines)
    assert r.format == "preference"
    assert [e.line for e in r.errors] == [1, 2, 4]
    assert "but the file is 'preference' (set by line 3)" in r.errors[2].message


def test_declared_mismatch_names_missing_key():
    r = check_lines(jl(GOOD["text"][0], GOOD["text"][1]), "messages")
    assert not r.ok and r.format == "messages"
    assert [e.line for e in r.errors] == [1, 2]
    m = r.errors[0].message
    assert m.startswith("missing 'messages'")
    assert "looks like 'text' but dataset.format is 'messages'" in m

    r = check_lines(jl({"prompt": "p", "chosen": "a", "rejected": "b"}), "prompt-completion")
    assert r.errors[0].message.startswith("missing 'completion'")

    r = check_lines(jl(GOOD["messages"][0]), "preference")
    assert r.errors[0].message.startswith("missing 'prompt', 'chosen' and 'rejected'")


def test_ambiguous_row_auto_is_error_naming_keys():
    row = {"messages": [U("a"), A("b")], "prompt": "p"}
    r = check_lines(jl(row))
    assert not r.ok and r.format is None
    m = r.errors[0].message
    assert "ambiguous" in m and "'messages'" in m and "'prompt'" in m

    r = check_lines(jl({"prompt": "p", "completion": "c", "text": "pc"}))
    m = r.errors[0].message
    assert "ambiguous" in m and "'text'" in m and "'completion'" in m


def test_ambiguous_row_resolved_by_declared_format():
    row = {"prompt": "p", "completion": "c", "text": "p c"}
    r = check_lines(jl(row), "prompt-completion")
    assert r.ok
    assert normalize_row(row, "prompt-completion") == {"prompt": "p", "completion": "c"}
    assert check_lines(jl(row), "text").ok


def test_unknown_declared_format_is_programming_error():
    with pytest.raises(ValueError, match="unknown dataset format"):
        check_lines(jl({"text": "a"}), "chat")


def test_declared_accepts_enum_and_none():
    from tuneop.api.finetunejob import DatasetFormat

    r = check_lines(jl({"text": "a"}), DatasetFormat.text)
    assert r.ok and r.format == "text" and type(r.format) is str
    assert check_lines(jl({"text": "a"}), DatasetFormat.auto).format == "text"
    assert check_lines(jl({"text": "a"}), None).ok


# ---------------------------------------------------------------------------------------------
# max_errors, report, summary, exception


def test_max_errors_caps_list_but_counts_everything():
    lines = jl(*([{"text": "ok"}] + ["{bad"] * 25 + [{"text": "ok"}]))
    r = check_lines(lines, max_errors=4, source="train.jsonl")
    assert r.rows == 27
    assert len(r.errors) == 4 and r.total_errors == 25
    assert [e.line for e in r.errors] == [2, 3, 4, 5]
    s = r.summary()
    assert s.startswith("train.jsonl line 2: invalid JSON: ")
    assert "; line 3: invalid JSON" in s and "; line 4: invalid JSON" in s
    assert "line 5" not in s
    assert s.endswith("(and 22 more errors)")
    assert r.to_dict()["totalErrors"] == 25
    # non-positive caps still keep one
    assert len(check_lines(lines, max_errors=0).errors) == 1


def test_summary_ok_and_token_estimate():
    text = "x" * 400
    r = check_lines(jl(*[{"text": text}] * 10))
    assert r.estimated_tokens == 1000  # 4000 chars / 4
    assert r.summary() == "10 rows, ~1K tokens"
    one = check_lines(jl({"prompt": "abc", "completion": "defgh"}))
    assert one.estimated_tokens == 2 and one.summary() == "1 row, ~2 tokens"


def test_token_estimate_counts_all_text_fields():
    row = {"prompt": [S("s" * 4), U("u" * 8)], "chosen": [A("c" * 12)], "rejected": [A("r" * 16)], "id": "zzzzzzzz"}
    assert check_lines(jl(row)).estimated_tokens == 10
    r = check_lines(jl({"text": "a" * 40}, "{bad", {"text": "b" * 40}))
    assert r.estimated_tokens == 20  # invalid rows do not count


@pytest.mark.parametrize(
    "n,s", [(0, "0"), (999, "999"), (1000, "1K"), (12_345, "12.3K"), (900_000, "0.9M"), (1_250_000, "1.2M"), (3_000_000_000, "3B")]
)
def test_human_tokens(n, s):
    assert ds._human_tokens(n) == s


def test_summary_example_shape():
    r = DatasetReport(True, "messages", 4000, 900_000, [])
    assert r.summary() == "4000 rows, ~0.9M tokens"
    r = DatasetReport(
        False, "messages", 4000, 0, [LineError(7, "invalid JSON: x"), LineError(9, "y")], source="train.jsonl", total_errors=5
    )
    assert r.summary() == "train.jsonl line 7: invalid JSON: x; line 9: y (and 3 more errors)"
    assert DatasetReport(False, None, 1, 0, [LineError(3, "z")]).summary() == "line 3: z"
    r = DatasetReport(False, None, 5, 0, [LineError(1, "a"), LineError(2, "b"), LineError(3, "c"), LineError(4, "d")])
    assert r.summary() == "line 1: a; line 2: b; line 3: c (and 1 more error)"


def test_to_dict_camel_case_and_round_trip():
    r = check_lines(jl({"text": "abcd"}, "[1]"), source="s.jsonl")
    d = r.to_dict()
    assert d == {
        "ok": False,
        "format": "text",
        "rows": 2,
        "estimatedTokens": 1,
        "errors": [{"line": 2, "message": "expected a JSON object, got array"}],
        "totalErrors": 1,
        "source": "s.jsonl",
    }
    assert json.loads(json.dumps(d)) == d
    assert DatasetReport.from_dict(d) == r


def test_long_messages_are_truncated():
    row = {"messages": [U("a"), {"role": "x" * 1000, "content": "b"}]}
    r = check_lines(jl(row))
    m = r.errors[0].message
    assert len(m) < 200 and m.startswith("messages[1].role: ") and "..." in m
    r = check_lines(jl({"text": "a"}, {f"k{i}" * 50: 1 for i in range(30)}))
    assert len(r.errors[0].message) <= 300


def test_dataset_error():
    r = check_lines(jl("{bad"), source="t.jsonl")
    e = DatasetError(r)
    assert e.report is r
    assert str(e) == r.summary() and str(e).startswith("t.jsonl line 1: invalid JSON")
    e2 = pickle.loads(pickle.dumps(e))
    assert e2.report == r and str(e2) == str(e)
    e3 = DatasetError("boom")
    assert not e3.report.ok and str(e3) == "boom"


# ---------------------------------------------------------------------------------------------
# normalisation, read_rows


def test_normalize_rows():
    assert normalize_row({"messages": [S("s"), U("u"), A("a")]}, "messages") == {"messages": [S("s"), U("u"), A("a")]}
    assert normalize_row({"prompt": "p", "completion": "c", "x": 1}, "prompt-completion") == {"prompt": "p", "completion": "c"}
    assert normalize_row({"prompt": [U("p")], "completion": [A("c")]}, "prompt-completion") == {
        "prompt": [U("p")],
        "completion": [A("c")],
    }
    assert normalize_row({"text": "t", "meta": {}}, "text") == {"text": "t"}
    assert normalize_row({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference") == {
        "prompt": "p",
        "chosen": "a",
        "rejected": "b",
    }
    assert normalize_row(GOOD["preference"][2], "auto") == {"prompt": [U("Sky colour?")], "chosen": [A("Blue.")], "rejected": [A("Green.")]}
    with pytest.raises(ValueError, match="unrecognised row"):
        normalize_row({"foo": 1}, "auto")
    with pytest.raises(ValueError, match="ambiguous"):
        normalize_row({"messages": [], "prompt": "p"}, "auto")


def test_normalize_does_not_alias_input():
    row = {"messages": [U("a"), A("b")]}
    out = normalize_row(row, "messages")
    out["messages"][0]["content"] = "changed"
    assert row["messages"][0]["content"] == "a"


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_rows_returns_normalized(tmp_path, fmt):
    path = write(tmp_path, ["", *jl(*GOOD[fmt]), ""])
    got_fmt, rows = read_rows(path)
    assert got_fmt == fmt
    assert rows == [normalize_row(r, fmt) for r in GOOD[fmt]]
    assert read_rows(path, fmt) == (fmt, rows)


def test_read_rows_raises_on_any_bad_line(tmp_path):
    path = write(tmp_path, jl(*([{"text": "ok"}] * 50), "{bad", {"text": "ok"}))
    with pytest.raises(DatasetError) as ei:
        read_rows(path)
    rep = ei.value.report
    assert not rep.ok and rep.rows == 52 and msgs(rep)[0][0] == 51
    assert "line 51: invalid JSON" in str(ei.value)
    with pytest.raises(DatasetError, match="no rows"):
        read_rows(write(tmp_path, [""], "empty.jsonl"))
    with pytest.raises(DatasetError, match="missing 'messages'"):
        read_rows(write(tmp_path, jl({"text": "a"}), "t.jsonl"), "messages")


def test_check_file_source_override(tmp_path):
    r = check_file(write(tmp_path, ["{bad"]), source="news/train.jsonl")
    assert r.source == "news/train.jsonl" and r.summary().startswith("news/train.jsonl line 1:")


def test_check_lines_accepts_whole_document_and_bytes():
    # U+2028 is legal raw inside a JSON string; str.splitlines() would break the row
    doc = json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n\n" + json.dumps({"text": "c"}) + "\n"
    r = check_lines(doc)
    assert r.ok and r.rows == 2
    r = check_lines(doc.encode())
    assert r.ok and r.rows == 2
    r = check_lines([b'{"text": "ok"}\n', b'{"text": "\xff"}\n'])
    assert [e.line for e in r.errors] == [2] and "invalid UTF-8" in r.errors[0].message


# ---------------------------------------------------------------------------------------------
# Together <-> TRL preference


def test_together_to_trl_to_together_round_trip():
    together = {
        "input": {"messages": [S("be kind"), U("q1"), A("a1"), U("q2")]},
        "preferred_output": [A("good")],
        "non_preferred_output": [A("bad")],
    }
    trl = normalize_row(together, "preference")
    assert trl == {"prompt": [S("be kind"), U("q1"), A("a1"), U("q2")], "chosen": [A("good")], "rejected": [A("bad")]}
    assert to_together_preference(trl) == together
    assert to_together_preference(together) == together
    # and TRL conversational -> Together -> TRL
    assert normalize_row(to_together_preference(trl), "preference") == trl


def test_trl_string_preference_to_together():
    out = to_together_preference({"prompt": "Q?", "chosen": "yes", "rejected": "no"})
    assert out == {
        "input": {"messages": [U("Q?")]},
        "preferred_output": [A("yes")],
        "non_preferred_output": [A("no")],
    }


def test_to_together_rejects_invalid_and_multi_message_answers():
    with pytest.raises(ValueError, match="exactly one assistant message in 'chosen'"):
        to_together_preference({"prompt": [U("q")], "chosen": [A("a"), A("b")], "rejected": [A("c")]})
    with pytest.raises(ValueError, match="identical"):
        to_together_preference({"prompt": "q", "chosen": "a", "rejected": "a"})
    with pytest.raises(ValueError, match="missing 'rejected'"):
        to_together_preference({"prompt": "q", "chosen": "a"})


def test_together_file_checks_and_reads(tmp_path):
    rows = [
        {"input": {"messages": [U(f"q{i}")]}, "preferred_output": [A(f"good{i}")], "non_preferred_output": [A(f"bad{i}")]}
        for i in range(3)
    ]
    path = write(tmp_path, jl(*rows, GOOD["preference"][1]))
    fmt, out = read_rows(path, "preference")
    assert fmt == "preference" and len(out) == 4
    assert out[0] == {"prompt": [U("q0")], "chosen": [A("good0")], "rejected": [A("bad0")]}
    assert [to_together_preference(r) for r in out[:3]] == rows
