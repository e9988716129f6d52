"""The atomic checkpoint protocol without DeepSpeed: what is complete, what is skipped, what is kept."""
import os

import pytest

from framework.train import checkpoint as ck


def fake_save(directory, step, payload=b"x" * 100):
    tmp = os.path.join(directory, ck.tmp_tag_for(step))
    os.makedirs(tmp)
    with open(os.path.join(tmp, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(payload)
    with open(ck.rank_file(tmp, 0), "wb") as f:
        f.write(payload[:10])
    return ck.finalize(directory, step, {"world_size": 1, "zero_stage": 2})


def test_finalize_and_latest(tmp_path):
    d = str(tmp_path)
    final = fake_save(d, 10)
    assert os.path.basename(final) == "step00000010"
    assert open(os.path.join(d, "latest")).read().strip() == "step00000010"
    assert ck.validate(final) is None
    meta = ck.read_meta(final)
    assert meta["step"] == 10 and meta["files"]["rank00000.pt"] == 10
    assert ck.find_resume(d, "auto") == final


def test_partial_save_never_loaded(tmp_path):
    d = str(tmp_path)
    good = fake_save(d, 2)
    # a save killed before finalize: only the .tmp dir exists
    os.makedirs(os.path.join(d, ck.tmp_tag_for(4)))
    assert ck.find_resume(d, "auto") == good
    # a complete-looking dir without the manifest (e.g. copied by hand) is not complete either
    os.makedirs(os.path.join(d, ck.tag_for(6)))
    assert ck.find_resume(d, "auto") == good


def test_truncated_file_falls_back_with_warning(tmp_path):
    d = str(tmp_path)
    first = fake_save(d, 2)
    second = fake_save(d, 4)
    with open(os.path.join(second, "mp_rank_00_model_states.pt"), "r+b") as f:
        f.truncate(50)
    assert "truncated" in ck.validate(second)
    with pytest.warns(UserWarning, match="truncated"):
        assert ck.find_resume(d, "auto") == first
    os.remove(os.path.join(first, "rank00000.pt"))
    with pytest.warns(UserWarning):
        assert ck.find_resume(d, "auto") is None


def test_explicit_resume_must_be_valid(tmp_path):
    d = str(tmp_path)
    assert ck.find_resume(d, "") is None
    assert ck.find_resume(d, "auto") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.find_resume(d, "step00000099")
    tag = fake_save(d, 3)
    assert ck.find_resume(d, "step00000003") == tag
    assert ck.find_resume(d, tag) == tag


def test_prune_keep_last_and_every(tmp_path):
    d = str(tmp_path)
    for s in range(1, 11):
        fake_save(d, s)
    os.makedirs(os.path.join(d, ck.tmp_tag_for(3)))      # stale tmp from a dead save
    ck.prune(d, keep_last=2, keep_every=4)
    assert ck.complete_tags(d) == [ck.tag_for(s) for s in (4, 8, 9, 10)]
    assert not os.path.exists(os.path.join(d, ck.tmp_tag_for(3)))
