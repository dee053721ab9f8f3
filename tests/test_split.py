"""Split GGUFs (llama.cpp's gguf-split layout, written here by gguf's own GGUFWriter) run as one model."""
import os

import gguf
import numpy as np
import pytest

import glmcpu
from glmcpu.hub import demo_path
from glmcpu.errors import ModelFileError
from glmcpu.quantize import copy_metadata


def write_split(src, folder, per_part):
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(os.path.join(folder, "demo.gguf"), r.fields["general.architecture"].contents(),
                        split_max_tensors=per_part)
    copy_metadata(r, w)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(os.path.join(folder, n) for n in os.listdir(folder))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return write_split(demo_path(), str(tmp_path_factory.mktemp("split")), per_part=12)


def test_split_model_equals_the_single_file(parts):
    assert len(parts) > 2 and parts[0].endswith("-00001-of-%05d.gguf" % len(parts))
    whole, split = glmcpu.load(demo_path()), glmcpu.load(parts[0])
    assert len(split.file.parts) == len(parts) and set(split.file.tensors) == set(whole.file.tensors)
    ids = whole.tokenizer.encode("In the beginning God created the heaven")
    assert np.array_equal(split.logits(ids), whole.logits(ids))
    assert split.file.size == sum(os.path.getsize(p) for p in parts)


def test_split_errors_name_the_part(parts, tmp_path):
    with pytest.raises(ModelFileError, match="part 2 of .*give the first part"):
        glmcpu.load(parts[1])
    for p in parts:
        os.link(p, tmp_path / os.path.basename(p))
    os.unlink(tmp_path / os.path.basename(parts[-1]))
    with pytest.raises(ModelFileError, match=f"no such file \\(part {len(parts)} of {len(parts)}.*download every part"):
        glmcpu.load(str(tmp_path / os.path.basename(parts[0])))
    renamed = tmp_path / "first.gguf"
    os.link(parts[0], renamed)
    with pytest.raises(ModelFileError, match="not named like one"):
        glmcpu.load(str(renamed))
