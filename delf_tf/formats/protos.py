"""The reference's protocol buffers (datum, feature, delf_config), built at run time.

The reference DELF code ships `.proto` files that users compile with protoc.
Here the same messages are described in Python as `FileDescriptorProto`s,
registered in a private `DescriptorPool` (so they never clash with another copy
of `delf.protos` loaded in the same process), and turned into message classes
with `message_factory.GetMessageClass`. Package `delf.protos`, proto2 syntax,
field names, numbers and defaults as in the reference:

  datum.proto       DatumShape {repeated int64 dim = 1 [packed]}
                    FloatList {repeated float value = 1 [packed]}
                    Uint32List {repeated uint32 value = 1 [packed]}
                    DatumProto {shape = 1; oneof kind_oneof {float_list = 2; uint32_list = 3}}
  feature.proto     DelfFeature {descriptor = 1 (DatumProto); float x = 2, y = 3,
                    scale = 4, orientation = 5, strength = 6}
                    DelfFeatures {repeated DelfFeature feature = 1}
  delf_config.proto DelfPcaParameters, DelfLocalFeatureConfig,
                    DelfGlobalFeatureConfig, DelfConfig

The repeated fields of delf_config.proto are left unpacked (the proto2
default); text format, the only form in which configs are exchanged, does not
depend on it. No TensorFlow, no generated `_pb2` modules.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "delf.protos"
_F = descriptor_pb2.FieldDescriptorProto

# Field spec: (name, number, type, label, type_name or None, default text or None, packed)
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_MSG = _F.TYPE_MESSAGE


def _message(
    file: descriptor_pb2.FileDescriptorProto,
    name: str,
    fields: list[tuple],
    oneofs: dict[str, tuple[str, ...]] | None = None,
) -> None:
    message = file.message_type.add(name=name)
    oneof_index = {}
    for index, (oneof_name, members) in enumerate((oneofs or {}).items()):
        message.oneof_decl.add(name=oneof_name)
        oneof_index.update({member: index for member in members})
    for field_name, number, field_type, label, type_name, default, packed in fields:
        field = message.field.add(name=field_name, number=number, type=field_type, label=label)
        if type_name is not None:
            field.type_name = f".{PACKAGE}.{type_name}"
        if default is not None:
            field.default_value = default
        if packed:
            field.options.packed = True
        if field_name in oneof_index:
            field.oneof_index = oneof_index[field_name]


def _file(name: str, dependencies: tuple[str, ...] = ()) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto(
        name=name, package=PACKAGE, syntax="proto2", dependency=list(dependencies)
    )


def _datum_file() -> descriptor_pb2.FileDescriptorProto:
    file = _file("delf/protos/datum.proto")
    _message(file, "DatumShape", [("dim", 1, _F.TYPE_INT64, _REP, None, None, True)])
    _message(file, "FloatList", [("value", 1, _F.TYPE_FLOAT, _REP, None, None, True)])
    _message(file, "Uint32List", [("value", 1, _F.TYPE_UINT32, _REP, None, None, True)])
    _message(
        file,
        "DatumProto",
        [
            ("shape", 1, _MSG, _OPT, "DatumShape", None, False),
            ("float_list", 2, _MSG, _OPT, "FloatList", None, False),
            ("uint32_list", 3, _MSG, _OPT, "Uint32List", None, False),
        ],
        oneofs={"kind_oneof": ("float_list", "uint32_list")},
    )
    return file


def _feature_file() -> descriptor_pb2.FileDescriptorProto:
    file = _file("delf/protos/feature.proto", ("delf/protos/datum.proto",))
    floats = [
        (name, number, _F.TYPE_FLOAT, _OPT, None, None, False)
        for number, name in enumerate(("x", "y", "scale", "orientation", "strength"), start=2)
    ]
    _message(
        file, "DelfFeature", [("descriptor", 1, _MSG, _OPT, "DatumProto", None, False), *floats]
    )
    _message(file, "DelfFeatures", [("feature", 1, _MSG, _REP, "DelfFeature", None, False)])
    return file


def _config_file() -> descriptor_pb2.FileDescriptorProto:
    file = _file("delf/protos/delf_config.proto")
    s, i32, b, f = _F.TYPE_STRING, _F.TYPE_INT32, _F.TYPE_BOOL, _F.TYPE_FLOAT
    pca = "DelfPcaParameters"
    _message(
        file,
        pca,
        [
            ("mean_path", 1, s, _OPT, None, None, False),
            ("projection_matrix_path", 2, s, _OPT, None, None, False),
            ("pca_dim", 3, i32, _OPT, None, None, False),
            ("use_whitening", 4, b, _OPT, None, "false", False),
            ("pca_variances_path", 5, s, _OPT, None, None, False),
        ],
    )
    _message(
        file,
        "DelfLocalFeatureConfig",
        [
            ("use_pca", 1, b, _OPT, None, "true", False),
            ("layer_name", 2, s, _OPT, None, "", False),
            ("iou_threshold", 3, f, _OPT, None, "1.0", False),
            ("max_feature_num", 4, i32, _OPT, None, "1000", False),
            ("score_threshold", 5, f, _OPT, None, "100.0", False),
            ("pca_parameters", 6, _MSG, _OPT, pca, None, False),
            ("use_resized_coordinates", 7, b, _OPT, None, "false", False),
        ],
    )
    _message(
        file,
        "DelfGlobalFeatureConfig",
        [
            ("use_pca", 1, b, _OPT, None, "true", False),
            ("pca_parameters", 2, _MSG, _OPT, pca, None, False),
            ("image_scales_ind", 3, i32, _REP, None, None, False),
        ],
    )
    _message(
        file,
        "DelfConfig",
        [
            ("model_path", 1, s, _OPT, None, None, False),
            ("image_scales", 2, f, _REP, None, None, False),
            ("delf_local_config", 3, _MSG, _OPT, "DelfLocalFeatureConfig", None, False),
            ("max_image_size", 4, i32, _OPT, None, "-1", False),
            ("min_image_size", 5, i32, _OPT, None, "-1", False),
            ("use_square_images", 6, b, _OPT, None, "false", False),
            ("use_local_features", 7, b, _OPT, None, "true", False),
            ("use_global_features", 8, b, _OPT, None, "false", False),
            ("delf_global_config", 9, _MSG, _OPT, "DelfGlobalFeatureConfig", None, False),
            ("is_tf2_exported", 10, b, _OPT, None, "false", False),
        ],
    )
    return file


POOL = descriptor_pool.DescriptorPool()
for _proto in (_datum_file(), _feature_file(), _config_file()):
    POOL.Add(_proto)


def _class(name: str) -> type:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


DatumShape = _class("DatumShape")
FloatList = _class("FloatList")
Uint32List = _class("Uint32List")
DatumProto = _class("DatumProto")
DelfFeature = _class("DelfFeature")
DelfFeatures = _class("DelfFeatures")
DelfPcaParameters = _class("DelfPcaParameters")
DelfLocalFeatureConfig = _class("DelfLocalFeatureConfig")
DelfGlobalFeatureConfig = _class("DelfGlobalFeatureConfig")
DelfConfig = _class("DelfConfig")

__all__ = [
    "POOL",
    "DatumProto",
    "DatumShape",
    "DelfConfig",
    "DelfFeature",
    "DelfFeatures",
    "DelfGlobalFeatureConfig",
    "DelfLocalFeatureConfig",
    "DelfPcaParameters",
    "FloatList",
    "Uint32List",
]
