"""Shapes edits: proposals are well-formed and the pixel checker passes the wanted scene and fails
the unedited one, per kind."""

from collections import Counter

import numpy as np

from jaxunified.data import shapes, shapes_chat, shapes_edit


def test_checker_passes_the_edited_scene_and_fails_the_source():
    rng = np.random.default_rng(0)
    kinds, ok, bad = Counter(), Counter(), Counter()
    vocab = shapes_chat.ChatVocab()
    for i in range(300):
        ex = shapes.render_example(i, "test", resolution=32)
        e = shapes_edit.random_edit(shapes.scene_objects(ex), rng)
        if e is None:
            continue
        vocab.encode(e.instruction)  # every instruction is in the chat vocabulary
        kinds[e.kind] += 1
        ok[e.kind] += shapes_edit.check_edit(shapes.render_objects(e.target, 32), e).passed
        bad[e.kind] += shapes_edit.check_edit(ex["image"], e).passed
    assert set(kinds) == set(shapes_edit.EDIT_KINDS) and min(kinds.values()) >= 30, kinds
    assert sum(ok.values()) / sum(kinds.values()) >= 0.98
    assert all(bad[k] / kinds[k] <= 0.05 for k in kinds), bad


def test_a_move_the_wrong_way_or_a_changed_bystander_fails():
    objs = [(0, 0, 0, (0.3, 0.5)), (1, 2, 0, (0.75, 0.5))]  # a red circle, a blue square
    e = shapes_edit.propose(objs, "move", np.random.default_rng(0))
    assert e is not None and e.direction in shapes_edit.DIRECTIONS
    assert shapes_edit.check_edit(shapes.render_objects(e.target, 64), e).passed
    dx, dy = shapes_edit.DIRECTIONS[e.direction]
    i = e.index
    s, c, z, (x, y) = objs[i]
    wrong = list(objs)
    wrong[i] = (s, c, z, (x - dx * 0.1, y - dy * 0.1))
    assert not shapes_edit.check_edit(shapes.render_objects(wrong, 64), e).passed
    recolor = shapes_edit.Edit("recolor", "make the red circle green", tuple(objs),
                               ((0, 1, 0, (0.3, 0.5)), objs[1]), 0)
    bystander_moved = [(0, 1, 0, (0.3, 0.5)), (1, 2, 0, (0.75, 0.25))]
    assert shapes_edit.check_edit(shapes.render_objects(recolor.target, 64), recolor).passed
    assert not shapes_edit.check_edit(shapes.render_objects(bystander_moved, 64), recolor).passed
