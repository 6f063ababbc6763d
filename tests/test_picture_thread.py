"""docmem/pictures/picture_thread.py: pictures are drawn by one helper thread, in order; leaving the block
waits for all of them; a failed picture raises there (after the others), unless the block is already
raising."""
from __future__ import annotations

import threading
import time

import pytest

from docmem.pictures.picture_thread import PictureThread


def test_pictures_are_drawn_in_order_by_one_other_thread():
    seen: list[tuple[int, str]] = []

    def picture(i: int) -> None:
        time.sleep(0.01)
        seen.append((i, threading.current_thread().name))

    with PictureThread() as pictures:
        for i in range(4):
            pictures.draw(picture, i)
    assert [i for i, _ in seen] == [0, 1, 2, 3]  # all done when the block is left
    names = {name for _, name in seen}
    assert len(names) == 1 and threading.current_thread().name not in names


def test_a_failed_picture_raises_after_the_others():
    done: list[int] = []

    def bad() -> None:
        raise ValueError("no such colour map")

    with pytest.raises(ValueError, match="colour map"):
        with PictureThread() as pictures:
            pictures.draw(bad)
            pictures.draw(done.append, 1)
    assert done == [1]


def test_the_blocks_own_error_is_not_masked():
    def bad() -> None:
        raise ValueError("picture")

    with pytest.raises(KeyError):
        with PictureThread() as pictures:
            pictures.draw(bad)
            raise KeyError("measuring")


def test_draw_outside_the_block_is_refused():
    with pytest.raises(RuntimeError, match="outside"):
        PictureThread().draw(print)
