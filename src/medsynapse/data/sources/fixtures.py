"""Small faithful copies of every supported layout: the real file names, all keys, real records where the reference
quotes them, generated 64x64 images. Used by the tests and by `medsynapse fixtures` to try `medsynapse eval` offline.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 64  # the tiny Qwen processor turns 64x64 into 4 image tokens


def _image(seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image(seed, "JPEG" if path.suffix in (".jpg", ".jpeg") else "PNG"))


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _hf_image(seed: int, name: str) -> dict:
    return {"bytes": _image(seed), "path": name}


def vqa_rad(root: Path) -> None:
    base = root / "vqa_rad"
    common = {"qid_linked_id": "NULL", "image_case_url": "https://medpix.nlm.nih.gov/case?id=placeholder",
              "evaluation": "given", "question_rephrase": "NULL", "question_relation": "NULL",
              "question_frame": "NULL"}
    records = [
        {"qid": 1, "phrase_type": "freeform", "image_name": "synpic54610.jpg", "image_organ": "HEAD",
         "question": "Are regions of the brain infarcted?", "question_type": "PRES", "answer": "Yes",
         "answer_type": "CLOSED", **common},
        {"qid": 2, "phrase_type": "test_freeform", "image_name": "synpic100.jpg", "image_organ": "CHEST",
         "question": "Is there evidence of an aortic aneurysm?", "question_type": "PRES", "answer": "yes",
         "answer_type": "CLOSED", **common},
        {"qid": 3, "phrase_type": "test_para", "image_name": "synpic100.jpg", "image_organ": "CHEST",
         "question": "What organ is enlarged?", "question_type": "SIZE", "answer": "heart", "answer_type": "OPEN",
         **common},
        {"qid": 4, "phrase_type": "test_freeform", "image_name": "synpic54610.jpg", "image_organ": "HEAD",
         "question": "How many lesions are there?", "question_type": "COUNT", "answer": 2, "answer_type": "CLOSED",
         **common},
    ]
    base.mkdir(parents=True, exist_ok=True)
    (base / "VQA_RAD Dataset Public.json").write_text(json.dumps(records, indent=1))
    for seed, name in enumerate(("synpic54610.jpg", "synpic100.jpg")):
        _write_image(base / "VQA_RAD Image Folder" / name, seed)
    rows = [("is there evidence of an aortic aneurysm?", "yes"), ("is the lesion hyperdense?", "no"),
            ("what organ is enlarged?", "heart")]
    for split in ("train", "test"):
        _parquet(root / "vqa_rad_hf" / "data" / f"{split}-00000-of-00001.parquet",
                 [{"image": _hf_image(10 + i, f"{i}.jpg"), "question": q, "answer": a}
                  for i, (q, a) in enumerate(rows)])


def slake(root: Path) -> None:
    base = root / "slake"
    shared = {"img_id": 102, "img_name": "xmlab102/source.jpg", "location": "Lung", "modality": "CT",
              "base_type": "vqa", "triple": ["vhead", "_", "_"]}
    test = [
        {**shared, "question": "What modality is used to take this image?", "answer": "CT", "q_lang": "en",
         "answer_type": "OPEN", "qid": 11934, "content_type": "Modality"},
        {**shared, "question": "Does the picture contain liver?", "answer": "No", "q_lang": "en",
         "answer_type": "CLOSED", "qid": 11938, "content_type": "Organ"},
        {**shared, "question": "这张图片的成像方式是什么?", "answer": "CT", "q_lang": "zh", "answer_type": "OPEN",
         "qid": 12000, "content_type": "Modality"},
        {**shared, "question": "Which organ is abnormal, heart or lung?", "answer": "Lung", "q_lang": "en",
         "answer_type": "CLOSED", "qid": 11940, "content_type": "Abnormality"},
    ]
    train = [
        {**shared, "question": "Which organ is shown?", "answer": "Lung", "q_lang": "en", "answer_type": "OPEN",
         "qid": 1, "content_type": "Organ"},
        {**shared, "question": "Is this a CT?", "answer": "Yes", "q_lang": "en", "answer_type": "CLOSED",
         "qid": 2, "content_type": "Modality"},
    ]
    base.mkdir(parents=True, exist_ok=True)
    (base / "test.json").write_text(json.dumps(test, ensure_ascii=False, indent=1))
    (base / "train.json").write_text(json.dumps(train, indent=1))
    (base / "validation.json").write_text(json.dumps(train[:1], indent=1))
    _write_image(base / "imgs" / "xmlab102" / "source.jpg", 20)


PATHVQA_ROWS = [("does this image show neutrophils?", "yes"), ("what have lost their nuclei?", "neutrophils"),
                ("is the tissue necrotic?", "no")]


def pathvqa(root: Path) -> None:
    for split in ("train", "test"):
        _parquet(root / "path_vqa" / "data" / f"{split}-00000-of-00001.parquet",
                 [{"image": _hf_image(30 + i, f"{split}_{i}.jpg"), "question": q, "answer": a}
                  for i, (q, a) in enumerate(PATHVQA_ROWS)])
    import pickle

    qas = root / "pvqa" / "qas" / "test"
    qas.mkdir(parents=True, exist_ok=True)
    records = [{"image": f"test_{i:04d}", "question": q, "answer": a} for i, (q, a) in enumerate(PATHVQA_ROWS)]
    (qas / "test_qa.pkl").write_bytes(pickle.dumps(records))
    for i in range(len(PATHVQA_ROWS)):
        _write_image(root / "pvqa" / "images" / "test" / f"test_{i:04d}.jpg", 40 + i)


def pmc_vqa(root: Path) -> None:
    base = root / "pmc_vqa"
    base.mkdir(parents=True, exist_ok=True)
    header = "Figure_path,Question,{answer},Choice A,Choice B,Choice C,Choice D,Answer_label\n"
    rows = ("PMC1064097_F1.jpg,What is the uptake pattern in the breast?,Focal uptake pattern,A:Diffuse uptake "
            "pattern,B:Focal uptake pattern,C:No uptake pattern,D:Cannot determine from the information given,B\n"
            "PMC1064097_F2.jpg,Which imaging modality was used?,PET-CT,A:MRI,B:Ultrasound,C:X-ray,D:PET-CT,D\n")
    (base / "test_clean.csv").write_text(header.format(answer="Answer") + rows)
    (base / "test.csv").write_text(header.format(answer="Anwser") + rows)
    _write_image(base / "images" / "PMC1064097_F1.jpg", 50)
    _write_image(base / "figures" / "PMC1064097_F2.jpg", 51)


def mmmu(root: Path) -> None:
    empty = {f"image_{k}": None for k in range(2, 8)}
    clinical = {"id": "validation_Clinical_Medicine_1", "question": "<image 1> What is the most likely diagnosis?",
                "options": "['Pneumonia', 'Effusion', 'Pneumothorax', 'Normal']", "explanation": "",
                "image_1": _hf_image(60, "1.png"), **empty, "img_type": "['X-ray']", "answer": "C",
                "topic_difficulty": "Easy", "question_type": "multiple-choice", "subfield": "Radiology"}
    two_images = {**clinical, "id": "validation_Clinical_Medicine_2",
                  "question": "Compare <image 1> and <image 2>. Which shows progression?",
                  "options": "['<image 1>', '<image 2>']", "answer": "B", "image_2": _hf_image(61, "2.png")}
    pharmacy = {"id": "validation_Pharmacy_3", "question": "<image 1> How many tablets per day?", "options": "[]",
                "explanation": "", "image_1": _hf_image(62, "3.png"), **empty, "img_type": "['Tables']",
                "answer": "2", "topic_difficulty": "Medium", "question_type": "open", "subfield": "Pharmacology"}
    _parquet(root / "mmmu" / "Clinical_Medicine" / "validation-00000-of-00001.parquet", [clinical, two_images])
    _parquet(root / "mmmu" / "Pharmacy" / "validation-00000-of-00001.parquet", [pharmacy])


MEDXPERTQA = [
    {"id": "MM-0", "question": "A 26-year-old man falls from a ladder ... Which surgical step is considered to "
     "contribute the most to rotatory stability?\nAnswer Choices: (A) Lateral collateral ligament complex repair or "
     "reconstruction (B) Capsular plication (C) Radial head replacement (D) Radial head ORIF (E) Medial collateral "
     "ligament complex reconstruction",
     "options": {"A": "Lateral collateral ligament complex repair or reconstruction", "B": "Capsular plication",
                 "C": "Radial head replacement", "D": "Radial head ORIF",
                 "E": "Medial collateral ligament complex reconstruction"},
     "label": "A", "images": ["MM-0-a.jpeg", "MM-0-b.jpeg"], "medical_task": "Treatment",
     "body_system": "Skeletal", "question_type": "Reasoning"},
    {"id": "MM-1", "question": "This patient presents for mammographic needle localization of a bar clip. What is the "
     "MOST optimal  approach for needle localization?\nAnswer Choices: (A) Lateral (B) Inferior (C) Medial "
     "(D) Superior (E) Oblique",
     "options": {"A": "Lateral", "B": "Inferior", "C": "Medial", "D": "Superior", "E": "Oblique"}, "label": "D",
     "images": ["MM-1-a.png"], "medical_task": "Basic Science", "body_system": "Reproductive",
     "question_type": "Reasoning"},
    {"id": "MM-2", "question": "Which imaging finding is shown?\nAnswer Choices: (A) Pleural effusion "
     "(B) Pneumothorax (C) Consolidation (D) Cardiomegaly (E) Normal study",
     "options": {"A": "Pleural effusion", "B": "Pneumothorax", "C": "Consolidation", "D": "Cardiomegaly",
                 "E": "Normal study"}, "label": "B", "images": ["MM-1-a.png"], "medical_task": "Diagnosis",
     "body_system": "Respiratory", "question_type": "Understanding"},
]


def medxpertqa(root: Path) -> None:
    base = root / "medxpertqa"
    (base / "MM").mkdir(parents=True, exist_ok=True)
    (base / "MM" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MEDXPERTQA))
    (base / "MM" / "dev.jsonl").write_text(json.dumps(MEDXPERTQA[1]) + "\n")
    for seed, name in enumerate(("MM-0-a.jpeg", "MM-0-b.jpeg", "MM-1-a.png")):
        _write_image(base / "images" / name, 70 + seed)


GMAI_COLUMNS = ("index", "question", "A", "B", "C", "D", "E", "answer", "image", "category", "clinical VQA task",
                "department", "perceptual granularity", "modality")


def gmai(root: Path) -> None:
    base = root / "gmai"
    base.mkdir(parents=True, exist_ok=True)
    image = base64.b64encode(_image(80)).decode()
    rows = [
        ["0", "What abnormality is shown in this fundus image?", "Glaucoma", "Diabetic retinopathy", "Cataract",
         "Normal", "", "B", image, "Disease Diagnosis", "Disease Diagnosis", "Ophthalmology", "Image Level",
         "Fundus Photography"],
        ["1", "Which structure is highlighted?", "Optic disc", "Macula", "Fovea", "Vessel", "Retina", "E", "0",
         "Anatomy Identification", "Anatomy Identification", "Ophthalmology", "Organ Level", "Fundus Photography"],
    ]
    val = ["\t".join(GMAI_COLUMNS)] + ["\t".join(r) for r in rows]
    (base / "GMAI-MMBench_VAL.tsv").write_text("\n".join(val) + "\n")
    test_columns = [c for c in GMAI_COLUMNS if c != "answer"]
    test = ["\t".join(test_columns)] + ["\t".join(r[:7] + r[8:]) for r in rows]
    (base / "GMAI_mm_bench_TEST_part_1.tsv").write_text("\n".join(test) + "\n")


OMNIMEDVQA_ACRIMA = [
    {"dataset": "ACRIMA", "question_id": "ACRIMA_0000", "question_type": "Modality Recognition",
     "question": "What imaging technique was employed to obtain this picture?", "gt_answer": "Fundus imaging",
     "image_path": "Images/ACRIMA/Im553_g_ACRIMA.png", "option_A": "PET scan", "option_B": "CT scan",
     "option_C": "Blood test", "option_D": "Fundus imaging", "modality_type": "Fundus Photography"},
    {"dataset": "ACRIMA", "question_id": "ACRIMA_0001", "question_type": "Disease Diagnosis",
     "question": "Is there glaucoma in this image?", "gt_answer": "No",
     "image_path": "Images/ACRIMA/Im553_g_ACRIMA.png",
     "option_A": "Yes", "option_B": "No", "modality_type": "Fundus Photography"},
]
OMNIMEDVQA_CHEST_CT = [
    {"dataset": "Chest CT Scan", "question_id": "Chest CT Scan_0000", "question_type": "Disease Diagnosis",
     "question": "What is the diagnosis?", "gt_answer": "Adenocarcinoma",
     "image_path": "/Images/Chest CT Scan/test/adenocarcinoma/000108.png", "option_A": "Adenocarcinoma",
     "option_B": "Normal", "option_C": "Squamous cell carcinoma", "modality": "CT(Computed Tomography)"},
]


def omnimedvqa(root: Path) -> None:
    base = root / "omnimedvqa"
    qa = base / "QA_information" / "Open-access"
    qa.mkdir(parents=True, exist_ok=True)
    (qa / "ACRIMA.json").write_text(json.dumps(OMNIMEDVQA_ACRIMA, indent=1))
    (qa / "Chest CT Scan.json").write_text(json.dumps(OMNIMEDVQA_CHEST_CT, indent=1))
    _write_image(base / "Images" / "ACRIMA" / "Im553_g_ACRIMA.png", 90)
    _write_image(base / "Images" / "Chest CT Scan" / "test" / "adenocarcinoma" / "000108.png", 91)


def pubmedvision(root: Path) -> None:
    base = root / "pubmedvision"
    base.mkdir(parents=True, exist_ok=True)
    records = [
        {"id": "pmc_demo_1", "image": ["images/pmc_demo_1.jpg"],
         "conversations": [{"from": "human", "value": "Describe the findings in this image."},
                           {"from": "gpt", "value": "Axial CT shows a hypodense lesion in the right hepatic lobe."}],
         "modality": "Computed Tomography", "body_part": "Abdomen"},
        {"id": "pmc_demo_2", "image": ["images/pmc_demo_1.jpg", "images/pmc_demo_2.jpg"],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat is shown?"},
                           {"from": "gpt", "value": "H&E stain showing granulomas."},
                           {"from": "human", "value": "Are they caseating?"},
                           {"from": "gpt", "value": "No, they are non-caseating."}],
         "modality": "Digital Photography", "body_part": "Lung"},
    ]
    (base / "PubMedVision_Alignment_VQA.json").write_text(json.dumps(records, indent=1))
    for seed, name in enumerate(("pmc_demo_1.jpg", "pmc_demo_2.jpg")):
        _write_image(base / "images" / name, 100 + seed)


def hgv_bundle(root: Path) -> None:
    base = root / "medical_multimodal_eval"
    base.mkdir(parents=True, exist_ok=True)
    records = [
        {"question": "Is there a pneumothorax?", "options": ["yes", "no"], "answer": "no", "image": ["images/x.png"],
         "dataset": "VQA-RAD_test", "subset": ""},
        {"question": "What is the most likely diagnosis?", "options": "['Pneumonia', 'Effusion', 'Normal']",
         "answer": "Effusion", "image": ["images/x.png"], "dataset": "MMMU_Medical_Validation",
         "subset": "Clinical_Medicine"},
        {"question": "Describe the lesion.", "options": [], "answer": "a mass", "image": ["images/x.png"],
         "dataset": "SLAKE_test", "subset": "", "question_type": "open"},
        {"question": "Which lobe?", "options": ["left", "right"], "answer": "?", "image": ["images/x.png"],
         "dataset": "PathVQA_test", "subset": ""},
    ]
    (base / "medical_multimodel_evaluation_data.json").write_text(json.dumps(records, indent=1))
    _write_image(base / "images" / "x.png", 110)


WRITERS = (vqa_rad, slake, pathvqa, pmc_vqa, mmmu, medxpertqa, gmai, omnimedvqa, pubmedvision, hgv_bundle)


def write_fixtures(root: str | Path) -> Path:
    """Write every fixture layout under `root` (the `--data-root` of `medsynapse eval`)."""
    root = Path(root)
    for writer in WRITERS:
        writer(root)
    return root
