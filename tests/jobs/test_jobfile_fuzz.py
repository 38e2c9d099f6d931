"""The validator never crashes: any input gives a spec or a JobSpecError whose every
problem names a field or a line. (Generated text has no ':', so it never names a
module to import.)"""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traind.jobs.errors import JobSpecError
from traind.jobs.jobfile import load_job

KEYS = {
    "": ["name", "seed", "priority", "device", "python_path", "model", "data", "optimizer", "scheduler",
         "train", "checkpoint", "nmae"],
    "model": ["layers", "target", "kwargs", "init", "blocks"],
    "data": ["source", "task", "samples", "features", "classes", "outputs", "path", "target", "header", "x", "y",
             "batch_size", "val_fraction", "shuffle", "num_workers"],
    "optimizer": ["name", "lr", "weight_decay", "no_decay", "momentum", "lrr"],
    "scheduler": ["name", "step_size", "gamma", "interval"],
    "train": ["epochs", "max_steps", "loss", "loss_kwargs", "grad_clip", "on_nonfinite"],
    "checkpoint": ["every_steps", "keep_last", "keep_best", "monitor", "mode", "best_after_epoch"],
}
WORDS = ["Linear", "ReLU", "@shared", "AdamW", "SGD", "StepLR", "CrossEntropyLoss", "synthetic", "csv",
         "classification", "regression", "val_acc", "max", "auto", "cpu", "cuda:0", "xavier_uniform", "zeros"]
text = st.one_of(st.sampled_from(WORDS), st.text(st.characters(blacklist_characters=":\x00",
                                                             blacklist_categories=["Cs"]), max_size=12))
scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True), text)
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(text, inner, max_size=3)), max_leaves=12)


@st.composite
def job_dicts(draw):
    job = {}
    for key in draw(st.lists(st.sampled_from(KEYS[""]), unique=True, max_size=8)):
        if key in KEYS and draw(st.booleans()):
            section = draw(st.lists(st.sampled_from(KEYS[key]), unique=True, max_size=5))
            job[key] = {k: draw(value) for k in section}
        else:
            job[key] = draw(value)
    return job


def check(path):
    try:
        load_job(path)
    except JobSpecError as e:
        assert e.problems
        for p in e.problems:
            assert p.path or p.line, p
            assert p.message


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(job=job_dicts())
def test_structured_job_files_never_crash_the_validator(tmp_path, job):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(job))
    check(path)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".toml", ".yaml", ".json"]))
def test_arbitrary_bytes_never_crash_the_validator(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data.replace(b":", b" "))
    check(path)
