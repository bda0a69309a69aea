"""Judge prompt sets (issue 20): ours, GEdit-Bench's read from lmms-eval, the requests, the digest."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys

import pytest
import yaml

from step1x_batch.errors import JobRefused
from step1x_batch.judge.answers import parse_preference, parse_scores
from step1x_batch.judge.prompts import AXES, GEDIT_EXTRA, JudgeRequest, PromptSet, load_prompts

IN1, IN2, OUT, A, B = b"\x89PNG in1", b"\xff\xd8 in2", b"RIFF out", b"edit-a", b"edit-b"


@pytest.fixture
def ours() -> PromptSet:
    return load_prompts("step1x-batch")


# --- our set -------------------------------------------------------------------------------------


def test_our_set_is_named_and_versioned_with_vieScores_sub_score_counts(ours):
    assert (ours.name, ours.version, ours.sc_scores, ours.pq_scores) == ("step1x-batch", "1", 2, 2)
    assert load_prompts("step1x-batch") is ours  # built once


def test_sc_request_sees_every_input_then_the_edit_and_names_the_instruction(ours):
    r = ours.sc_request("make the sky red", [IN1, IN2], OUT)
    assert isinstance(r, JudgeRequest)
    assert r.images == (IN1, IN2, OUT)
    assert r.system == ours.system and r.system
    assert r.text.rstrip().endswith("Editing instruction: make the sky red")
    assert "{instruction}" not in r.text


def test_pq_request_sees_the_edit_only(ours):
    r = ours.pq_request(OUT)
    assert r.images == (OUT,) and r.text == ours.pq and r.system == ours.system


def test_pairwise_request_sees_inputs_then_a_then_b_and_the_axis_description(ours):
    r = ours.pairwise_request("remove the hat", "visual_consistency", [IN1], A, B)
    assert r.images == (IN1, A, B)
    assert AXES["visual_consistency"] in r.text and "remove the hat" in r.text
    assert "{axis}" not in r.text and "{instruction}" not in r.text


def test_the_axes_are_the_three_named():
    assert set(AXES) == {"instruction_following", "visual_consistency", "quality"}
    assert all(d.strip() for d in AXES.values())


def test_an_unknown_axis_or_no_input_is_refused(ours):
    with pytest.raises(ValueError, match="unknown pairwise axis"):
        ours.pairwise_request("x", "beauty", [IN1], A, B)
    with pytest.raises(ValueError):
        ours.sc_request("x", [], OUT)
    with pytest.raises(ValueError):
        ours.pairwise_request("x", "quality", [], A, B)
    with pytest.raises(TypeError):
        ours.pq_request("not bytes")  # type: ignore[arg-type]


def test_an_instruction_is_put_in_as_written_braces_and_placeholders_included(ours):
    instruction = 'write "{axis}" and {instruction} on the {sign}'
    assert instruction in ours.sc_request(instruction, [IN1], OUT).text
    r = ours.pairwise_request(instruction, "quality", [IN1], A, B)
    assert instruction in r.text and r.text.count(AXES["quality"]) == 1


def test_requests_accept_bytearray_and_memoryview_as_bytes(ours):
    r = ours.sc_request("x", [bytearray(IN1)], memoryview(OUT))
    assert r.images == (IN1, OUT) and all(type(i) is bytes for i in r.images)


def _example(template: str, key: str) -> str:
    """The JSON answer form a template shows the judge."""
    [line] = [ln for ln in template.splitlines() if ln.startswith('{"' + key + '"')]
    return line


def test_our_templates_ask_for_the_answer_form_the_parser_reads(ours):
    """VIEScore's form: {"score": [s1, s2], "reasoning": ...} with two named sub-scores, in order."""
    sc_form, pq_form = _example(ours.sc, "score"), _example(ours.pq, "score")
    assert re.findall(r"\w+", sc_form.split("[")[1].split("]")[0]) == ["edit_success", "over_editing"]
    assert re.findall(r"\w+", pq_form.split("[")[1].split("]")[0]) == ["naturalness", "artifacts"]
    for form, count in ((sc_form, ours.sc_scores), (pq_form, ours.pq_scores)):
        filled = re.sub(r"\[[^\]]*\]", "[" + ", ".join(["7"] * count) + "]", form)
        assert parse_scores(filled, count).scores == (7.0,) * count
    pair_form = _example(ours.pairwise, "winner")
    assert parse_preference(pair_form.replace('"..."', '"B"', 1)).scores == (0.0,)
    assert "0 to 10" in ours.sc and "0 to 10" in ours.pq


def test_a_template_without_its_placeholders_is_refused(ours):
    with pytest.raises(ValueError, match="instruction"):
        dataclasses.replace(ours, sc="no placeholder")
    with pytest.raises(ValueError, match="axis"):
        dataclasses.replace(ours, pairwise="{instruction} only")
    with pytest.raises(ValueError):
        dataclasses.replace(ours, pq_scores=0)


def test_an_unknown_set_is_refused_with_the_known_names():
    with pytest.raises(JobRefused, match="'step1x-batch', 'gedit' or a .yaml file"):
        load_prompts("viescore")


def test_a_teams_own_prompt_set_from_a_yaml_file(tmp_path):
    ours = load_prompts("step1x-batch")
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump({"name": "catalog", "version": "3", "sc": "Did it do this: {instruction}?",
                                    "pq": "Is it clean?"}))
    team = load_prompts(str(path))
    assert (team.name, team.version, team.sc, team.pq) == ("catalog", "3", "Did it do this: {instruction}?", "Is it clean?")
    assert team.pairwise == ours.pairwise and team.system == ours.system  # what it leaves out is ours
    assert team.digest() != ours.digest()
    path.write_text(yaml.safe_dump({"name": "catalog", "version": "4", "sc": "Did it do this: {instruction}?",
                                    "pq": "Is it clean?"}))
    assert load_prompts(str(path)).digest() != team.digest()  # the version is part of the identity
    path.write_text(yaml.safe_dump({"name": "x", "version": "1", "sc": "no placeholder", "pq": "q"}))
    with pytest.raises(JobRefused, match="instruction"):
        load_prompts(str(path))
    path.write_text(yaml.safe_dump({"name": "x", "version": "1", "sc": "{instruction}", "pq": "q", "temp": 1}))
    with pytest.raises(JobRefused, match="nothing else"):
        load_prompts(str(path))
    with pytest.raises(JobRefused, match="cannot read"):
        load_prompts(str(tmp_path / "absent.yaml"))


# --- digest --------------------------------------------------------------------------------------


def test_the_digest_is_16_hex_and_changes_with_every_field(ours):
    digest = ours.digest()
    assert re.fullmatch(r"[0-9a-f]{16}", digest)
    seen = {digest}
    for field in dataclasses.fields(PromptSet):
        value = getattr(ours, field.name)
        changed = dataclasses.replace(ours, **{field.name: value + 1 if isinstance(value, int) else value + " "})
        seen.add(changed.digest())
    assert len(seen) == 1 + len(dataclasses.fields(PromptSet))


def test_one_changed_word_deep_in_a_prompt_changes_the_digest(ours):
    changed = dataclasses.replace(ours, pq=ours.pq.replace("natural", "realistic", 1))
    assert changed.pq != ours.pq and changed.digest() != ours.digest()


@pytest.mark.parametrize("hashseed", ["0", "12345"])
def test_the_digest_is_the_same_in_another_process(ours, hashseed):
    code = "from step1x_batch.judge.prompts import load_prompts; print(load_prompts('step1x-batch').digest())"
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ours.digest()


def test_prompts_and_answers_import_without_ray():
    code = "import sys, step1x_batch.judge.prompts, step1x_batch.judge.answers; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- gedit: GEdit-Bench's VIEScore prompts from lmms-eval ----------------------------------------


def test_gedit_without_lmms_eval_is_refused_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # what an absent package looks like to imports
    with pytest.raises(JobRefused) as info:
        load_prompts("gedit")
    message = str(info.value)
    assert GEDIT_EXTRA == "pip install 'step1x-batch[gedit]'" and GEDIT_EXTRA in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


# A stand-in for the installed lmms-eval with the real layout: the prompts in
# lmms_eval/tasks/gedit_bench/viescore/vie_prompts.py as module-level strings (the real module is
# generated by VIEScore's parse_prompt.py), a dist-info for the version, and package __init__s that
# fail when imported, since the real ones pull in the whole task registry and an OpenAI client.
_CONTEXT = 'You grade images.\nAnswer like this:\n{\n"score" : [...],\n"reasoning" : "..."\n}'
_RULE = "RULES:\n\nTwo images: the original, then the edit. \n"
_SC_RULE = "\nScores 0-10: success, overediting. \n\nEditing instruction: <instruction>\n"
_PQ_RULE = "RULES:\n\nOne image. Scores 0-10: naturalness, artifacts.\n"
_BOOM = "raise ImportError('the loader must read vie_prompts.py, not import lmms_eval')\n"


def _stand_in(root, version="0.7.3", names=None):
    names = names or {
        "_context_no_delimit": _CONTEXT,
        "_context": "with ||V^=^V|| delimiters",
        "_prompts_0shot_two_image_edit_rule": _RULE,
        "_prompts_0shot_tie_rule_SC": _SC_RULE,
        "_prompts_0shot_rule_PQ": _PQ_RULE,
        "_prompts_1shot_rule_PQ": "one-shot",
    }
    pkg = root / "lmms_eval"
    prompts = pkg / "tasks" / "gedit_bench" / "viescore"
    prompts.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for init in (pkg / "tasks", pkg / "tasks" / "gedit_bench", prompts):
        (init / "__init__.py").write_text(_BOOM)
    body = "# This file is generated automatically through parse_prompt.py\n\n"
    body += "".join(f'{k} = """{v}"""\n\n' for k, v in names.items())
    (prompts / "vie_prompts.py").write_text(body)
    info = root / f"lmms_eval-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lmms-eval\nVersion: {version}\n")
    return root


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_gedit_maps_the_packages_prompts_exactly_as_gedit_bench_joins_them(stand_in):
    _stand_in(stand_in)
    gedit = load_prompts("gedit")
    assert (gedit.name, gedit.version, gedit.system) == ("gedit", "0.7.3", "")
    assert (gedit.sc_scores, gedit.pq_scores) == (2, 2)
    instruction = "turn the {cat} <blue>"
    sc = gedit.sc_request(instruction, [IN1], OUT)
    # GEdit-Bench: "\n".join([context, two_image_edit_rule, tie_rule_SC]).replace("<instruction>", ...)
    assert sc.text == "\n".join([_CONTEXT, _RULE, _SC_RULE]).replace("<instruction>", instruction)
    assert sc.images == (IN1, OUT) and sc.system == ""
    pq = gedit.pq_request(OUT)
    assert pq.text == "\n".join([_CONTEXT, _PQ_RULE]) and pq.images == (OUT,)
    assert gedit.pairwise == load_prompts("step1x-batch").pairwise  # GEdit-Bench has no pairwise prompt
    assert "lmms_eval.tasks" not in sys.modules


def test_gedit_answers_in_the_form_its_context_shows_parse(stand_in):
    _stand_in(stand_in)
    gedit = load_prompts("gedit")
    answer = '{\n"score" : [6, 9],\n"reasoning" : "fine"\n}'
    assert parse_scores(answer, gedit.sc_scores).scores == (6.0, 9.0)


def test_gedit_digest_follows_the_packages_text_and_version(tmp_path, monkeypatch):
    digests = []
    for i, (version, rule) in enumerate([("0.7.3", _PQ_RULE), ("0.7.3", _PQ_RULE + "x"), ("0.7.4", _PQ_RULE)]):
        root = tmp_path / str(i)
        names = {
            "_context_no_delimit": _CONTEXT,
            "_prompts_0shot_two_image_edit_rule": _RULE,
            "_prompts_0shot_tie_rule_SC": _SC_RULE,
            "_prompts_0shot_rule_PQ": rule,
        }
        _stand_in(root, version, names)
        with monkeypatch.context() as m:
            for name in [k for k in sys.modules if k == "lmms_eval" or k.startswith("lmms_eval.")]:
                m.delitem(sys.modules, name)
            m.syspath_prepend(str(root))
            digests.append(load_prompts("gedit").digest())
    assert len(set(digests)) == 3
    assert load_prompts("step1x-batch").digest() not in digests


def test_gedit_from_a_package_without_the_prompts_is_refused_naming_the_extra(stand_in):
    _stand_in(stand_in, "0.9.0", {"_context_no_delimit": _CONTEXT, "_prompts_0shot_rule_PQ": _PQ_RULE})
    with pytest.raises(JobRefused) as info:
        load_prompts("gedit")
    message = str(info.value)
    assert "lmms-eval 0.9.0" in message and "_prompts_0shot_tie_rule_SC" in message and GEDIT_EXTRA in message


def test_gedit_prompt_module_is_parsed_not_run(stand_in):
    _stand_in(stand_in)
    path = stand_in / "lmms_eval" / "tasks" / "gedit_bench" / "viescore" / "vie_prompts.py"
    path.write_text(path.read_text() + 'import os\nos.environ["STEP1X_PROMPTS_RAN"] = "1"\n')
    assert load_prompts("gedit").pq == "\n".join([_CONTEXT, _PQ_RULE])
    assert "STEP1X_PROMPTS_RAN" not in os.environ


def test_gedit_prompt_that_is_computed_not_written_is_refused(stand_in):
    """Only a string constant can be read without running the module; a later computed value
    would replace it on import, so the text read would not be the package's."""
    _stand_in(stand_in)
    path = stand_in / "lmms_eval" / "tasks" / "gedit_bench" / "viescore" / "vie_prompts.py"
    path.write_text(path.read_text() + "_prompts_0shot_rule_PQ = _prompts_1shot_rule_PQ.upper()\n")
    with pytest.raises(JobRefused, match="_prompts_0shot_rule_PQ"):
        load_prompts("gedit")


def test_gedit_with_the_real_lmms_eval_when_installed():
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip("lmms-eval is not installed (the 'gedit' extra)")
    gedit = load_prompts("gedit")
    r = gedit.sc_request("add a hat", [IN1], OUT)
    assert r.system == "" and "Editing instruction: add a hat" in r.text and '"score"' in r.text
    assert "naturalness" in gedit.pq and "artifacts" in gedit.pq
