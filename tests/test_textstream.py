"""TextStream: UTF-8 safety and stop strings, without a model."""
from gguf_loader.textstream import TextStream


def feed_all(ts, pieces):
    out = []
    for p in pieces:
        text, stopped = ts.feed(p)
        out.append(text)
        if stopped:
            return "".join(out), True
    out.append(ts.flush())
    return "".join(out), False


def test_split_utf8_character_is_held_until_complete():
    ts = TextStream([])
    e = "é".encode()
    assert ts.feed(b"caf" + e[:1]) == ("caf", False)
    assert ts.feed(e[1:]) == ("é", False)


def test_stop_string_across_tokens_is_cut_and_never_shown():
    ts = TextStream(["\nUser:"])
    shown = []
    for p in [b"Hi", b" there", b"\n", b"Us", b"er", b": more"]:
        text, stopped = ts.feed(p)
        shown.append(text)
        assert "\n" not in "".join(shown) or stopped
        if stopped:
            break
    assert stopped
    assert "".join(shown) == "Hi there"
    assert ts.result_text == "Hi there"
    assert ts.stop_hit == "\nUser:"


def test_false_alarm_prefix_is_released():
    text, stopped = feed_all(TextStream(["STOP"]), [b"ST", b"OR", b"Y"])
    assert (text, stopped) == ("STORY", False)


def test_trim_stop_false_keeps_the_stop_text():
    text, stopped = feed_all(TextStream(["."], trim_stop=False), [b"One", b". Two"])
    assert stopped and text == "One."


def test_earliest_stop_wins():
    text, stopped = feed_all(TextStream(["b", "a"]), [b"xxab"])
    assert stopped and text == "xx"


def test_unfinished_prefix_flushed_at_end():
    text, stopped = feed_all(TextStream(["###"]), [b"a#", b"#"])
    assert (text, stopped) == ("a##", False)


def test_banned_phrase_held_back_at_token_granularity():
    ts = TextStream([], banned=["Bad Word"])
    assert ts.feed(b"Hi ") == ("Hi ", False)
    assert ts.feed(b"a b") == ("", False)  # "b" may start the phrase, so its whole token waits
    assert ts.feed(b"ad") == ("", False)
    assert ts.feed(b" W") == ("", False)
    assert ts.feed(b"ord") == ("", False)
    assert ts.find_banned() == (5, "bad word")  # case-insensitive
    assert ts.text[: ts.emitted] == "Hi "  # nothing of the phrase's tokens was shown


def test_banned_prefix_released_when_it_diverges():
    ts = TextStream([], banned=["slop"])
    out = [ts.feed(p)[0] for p in (b"The ", b"sl", b"ice")]
    assert "".join(out) + ts.flush() == "The slice"
    assert ts.find_banned() is None
