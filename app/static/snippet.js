// The run page's Python that loads a run's download with plain timm (as the README shows it).

// Images of more than 8 bits, as the engine reads them (worker/selftuning/pixels.py's
// to_8_bit with the dataset's white level): plain timm's `convert("RGB")` clips them white.
const WHITE_LEVEL_LINES = [
  "",
  "import numpy as np",
  "from PIL import Image",
  "",
  "def open_image(path):  # scaled as the run's images were: 255 / input_white_level",
  "    image = Image.open(path)",
  '    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # more than 8 bits',
  "        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)",
  '        values = values * (255.0 / config["input_white_level"])',
  '        image = Image.fromarray(np.clip(values + 0.5, 0, 255).astype(np.uint8), "L")',
  '    return image.convert("RGB")',
];

// `whiteLevel`: the exported config.json's input_white_level (null where no image of the
// dataset had more than 8 bits: then `Image.open(path).convert("RGB")` is what it trained on).
export function timmSnippet({ architecture, numClasses, whiteLevel = null }) {
  return [
    "import json, timm",
    "",
    `config = json.load(open("config.json"))  # ${architecture}, ${numClasses} classes`,
    "model = timm.create_model(",
    '    config["architecture"], pretrained=True, num_classes=config["num_classes"],',
    '    pretrained_cfg_overlay=dict(file="model.safetensors", **config["pretrained_cfg"]),',
    ").eval()",
    "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
    'labels = config["label_names"]  # output index -> class',
    ...(whiteLevel ? WHITE_LEVEL_LINES : []),
  ].join("\n");
}
