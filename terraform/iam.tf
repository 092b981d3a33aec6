# IAM roles for Batch, the Batch instances, Metaflow tasks, SageMaker, RDS
# monitoring and VPC flow logs. Inline policies reach only this stack's
# bucket, KMS key, ECR repositories, Aurora secret and log groups. Actions
# without resource-level permissions (ecr:GetAuthorizationToken, Describe
# calls) are the only statements on "*".

locals {
  arn_prefix_logs      = "arn:${local.partition}:logs:${local.region}:${local.account_id}"
  arn_prefix_sagemaker = "arn:${local.partition}:sagemaker:${local.region}:${local.account_id}"
  arn_prefix_ec2       = "arn:${local.partition}:ec2:${local.region}:${local.account_id}"
  arn_prefix_batch     = "arn:${local.partition}:batch:${local.region}:${local.account_id}"
  aurora_secret_arn    = aws_rds_cluster.optuna.master_user_secret[0].secret_arn
  ecr_repository_arns  = [for repository in aws_ecr_repository.main : repository.arn]
}

data "aws_iam_policy_document" "assume_role" {
  for_each = {
    batch       = "batch.amazonaws.com"
    ec2         = "ec2.amazonaws.com"
    ecs_tasks   = "ecs-tasks.amazonaws.com"
    sagemaker   = "sagemaker.amazonaws.com"
    rds_monitor = "monitoring.rds.amazonaws.com"
    flow_logs   = "vpc-flow-logs.amazonaws.com"
  }

  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = [each.value]
    }
  }
}

# Statements shared by every role that reads and writes the datastore bucket.
data "aws_iam_policy_document" "datastore_access" {
  statement {
    sid       = "ListDatastoreBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.datastore.arn]
  }

  statement {
    sid = "ReadWriteDatastoreObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
    ]
    resources = ["${aws_s3_bucket.datastore.arn}/*"]
  }

  statement {
    sid = "UseDatastoreKey"
    actions = [
      "kms:Decrypt",
      "kms:Encrypt",
      "kms:GenerateDataKey",
      "kms:DescribeKey",
    ]
    resources = [aws_kms_key.main.arn]
  }
}

# --- AWS Batch service role ---

resource "aws_iam_role" "batch_service" {
  name               = "${local.name}-batch-service"
  assume_role_policy = data.aws_iam_policy_document.assume_role["batch"].json
}

resource "aws_iam_role_policy_attachment" "batch_service" {
  role       = aws_iam_role.batch_service.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AWSBatchServiceRole"
}

# --- ECS container instance role for Batch instances ---

resource "aws_iam_role" "ecs_instance" {
  name               = "${local.name}-batch-instance"
  assume_role_policy = data.aws_iam_policy_document.assume_role["ec2"].json
}

resource "aws_iam_role_policy_attachment" "ecs_instance" {
  role       = aws_iam_role.ecs_instance.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role"
}

resource "aws_iam_instance_profile" "ecs_instance" {
  name = "${local.name}-batch-instance"
  role = aws_iam_role.ecs_instance.name
}

# --- Metaflow task role (METAFLOW_ECS_S3_ACCESS_IAM_ROLE) ---

resource "aws_iam_role" "batch_job" {
  name               = "${local.name}-batch-job"
  assume_role_policy = data.aws_iam_policy_document.assume_role["ecs_tasks"].json
}

resource "aws_iam_role_policy" "batch_job" {
  name   = "metaflow-task"
  role   = aws_iam_role.batch_job.id
  policy = data.aws_iam_policy_document.batch_job.json
}

data "aws_iam_policy_document" "batch_job" {
  source_policy_documents = [data.aws_iam_policy_document.datastore_access.json]

  statement {
    sid       = "ReadOptunaDatabaseSecret"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [local.aurora_secret_arn]
  }

  # The flow starts SageMaker training jobs and deploys the endpoint from
  # inside Batch steps.
  statement {
    sid = "RunSageMakerTrainingAndHosting"
    actions = [
      "sagemaker:CreateTrainingJob",
      "sagemaker:DescribeTrainingJob",
      "sagemaker:StopTrainingJob",
      "sagemaker:CreateModel",
      "sagemaker:DescribeModel",
      "sagemaker:DeleteModel",
      "sagemaker:CreateEndpointConfig",
      "sagemaker:DescribeEndpointConfig",
      "sagemaker:DeleteEndpointConfig",
      "sagemaker:CreateEndpoint",
      "sagemaker:UpdateEndpoint",
      "sagemaker:DescribeEndpoint",
      "sagemaker:DeleteEndpoint",
      "sagemaker:InvokeEndpoint",
      "sagemaker:AddTags",
      "sagemaker:ListTags",
    ]
    resources = [
      "${local.arn_prefix_sagemaker}:training-job/*",
      "${local.arn_prefix_sagemaker}:model/*",
      "${local.arn_prefix_sagemaker}:endpoint-config/*",
      "${local.arn_prefix_sagemaker}:endpoint/*",
    ]
  }

  statement {
    sid       = "PassSageMakerExecutionRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.sagemaker.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["sagemaker.amazonaws.com"]
    }
  }

  statement {
    sid     = "ReadSageMakerLogs"
    actions = ["logs:GetLogEvents", "logs:DescribeLogStreams", "logs:FilterLogEvents"]
    resources = [
      "${local.arn_prefix_logs}:log-group:/aws/sagemaker/*",
      "${local.arn_prefix_logs}:log-group:/aws/sagemaker/*:log-stream:*",
    ]
  }
}

# --- SageMaker execution role (training jobs and hosting) ---

resource "aws_iam_role" "sagemaker" {
  name               = "${local.name}-sagemaker"
  assume_role_policy = data.aws_iam_policy_document.assume_role["sagemaker"].json
}

resource "aws_iam_role_policy" "sagemaker" {
  name   = "training-and-hosting"
  role   = aws_iam_role.sagemaker.id
  policy = data.aws_iam_policy_document.sagemaker.json
}

data "aws_iam_policy_document" "sagemaker" {
  source_policy_documents = [data.aws_iam_policy_document.datastore_access.json]

  statement {
    sid       = "ReadOptunaDatabaseSecret"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [local.aurora_secret_arn]
  }

  # GetAuthorizationToken has no resource-level permissions.
  statement {
    sid       = "GetEcrLoginToken"
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }

  statement {
    sid = "PullTrainingAndServingImages"
    actions = [
      "ecr:BatchCheckLayerAvailability",
      "ecr:BatchGetImage",
      "ecr:GetDownloadUrlForLayer",
    ]
    resources = local.ecr_repository_arns
  }

  statement {
    sid = "WriteSageMakerLogs"
    actions = [
      "logs:CreateLogGroup",
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogStreams",
    ]
    resources = [
      "${local.arn_prefix_logs}:log-group:/aws/sagemaker/*",
      "${local.arn_prefix_logs}:log-group:/aws/sagemaker/*:log-stream:*",
    ]
  }

  # PutMetricData has no resource-level permissions; the namespace condition
  # limits it to SageMaker's metrics.
  statement {
    sid       = "PublishSageMakerMetrics"
    actions   = ["cloudwatch:PutMetricData"]
    resources = ["*"]

    condition {
      test     = "StringLike"
      variable = "cloudwatch:namespace"
      values   = ["/aws/sagemaker/*", "aws/sagemaker/*"]
    }
  }

  # Training jobs and endpoints launched with a VPC config attach network
  # interfaces in the private subnets with the SageMaker security group.
  statement {
    sid = "DescribeVpcForJobs"
    actions = [
      "ec2:DescribeNetworkInterfaces",
      "ec2:DescribeVpcs",
      "ec2:DescribeDhcpOptions",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
    ]
    resources = ["*"]
  }

  statement {
    sid     = "CreateNetworkInterfacesForJobs"
    actions = ["ec2:CreateNetworkInterface"]
    resources = concat(
      aws_subnet.private[*].arn,
      [
        aws_security_group.sagemaker.arn,
        "${local.arn_prefix_ec2}:network-interface/*",
      ],
    )
  }

  statement {
    sid = "ManageJobNetworkInterfaces"
    actions = [
      "ec2:CreateNetworkInterfacePermission",
      "ec2:DeleteNetworkInterface",
      "ec2:DeleteNetworkInterfacePermission",
    ]
    resources = ["${local.arn_prefix_ec2}:network-interface/*"]
  }
}

# --- Operator policy for people who launch the flow ---

# Attach this policy to the IAM user or role that runs
# `python flows/income_flow.py run --with batch` so Metaflow can submit and
# follow Batch jobs and read the datastore.
resource "aws_iam_policy" "operator" {
  name        = "${local.name}-operator"
  description = "Launch the tabmodel Metaflow flow on AWS Batch and read its datastore"
  policy      = data.aws_iam_policy_document.operator.json
}

data "aws_iam_policy_document" "operator" {
  source_policy_documents = [data.aws_iam_policy_document.datastore_access.json]

  statement {
    sid     = "SubmitMetaflowBatchJobs"
    actions = ["batch:SubmitJob", "batch:TagResource"]
    resources = concat(
      [for queue in aws_batch_job_queue.main : queue.arn],
      ["${local.arn_prefix_batch}:job-definition/*"],
    )
  }

  statement {
    sid       = "RegisterMetaflowJobDefinitions"
    actions   = ["batch:RegisterJobDefinition", "batch:TagResource"]
    resources = ["${local.arn_prefix_batch}:job-definition/*"]
  }

  statement {
    sid       = "TerminateMetaflowBatchJobs"
    actions   = ["batch:TerminateJob"]
    resources = ["${local.arn_prefix_batch}:job/*"]
  }

  # Batch Describe calls have no resource-level permissions.
  statement {
    sid = "DescribeBatchJobs"
    actions = [
      "batch:DescribeJobs",
      "batch:DescribeJobQueues",
      "batch:DescribeJobDefinitions",
      "batch:DescribeComputeEnvironments",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "PassMetaflowTaskRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.batch_job.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ecs-tasks.amazonaws.com"]
    }
  }

  statement {
    sid     = "ReadBatchJobLogs"
    actions = ["logs:GetLogEvents", "logs:DescribeLogStreams"]
    resources = [
      "${local.arn_prefix_logs}:log-group:/aws/batch/job",
      "${local.arn_prefix_logs}:log-group:/aws/batch/job:log-stream:*",
    ]
  }
}

# --- RDS Enhanced Monitoring ---

resource "aws_iam_role" "rds_monitoring" {
  name               = "${local.name}-rds-monitoring"
  assume_role_policy = data.aws_iam_policy_document.assume_role["rds_monitor"].json
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

# --- VPC flow logs ---

resource "aws_iam_role" "vpc_flow_log" {
  name               = "${local.name}-vpc-flow-log"
  assume_role_policy = data.aws_iam_policy_document.assume_role["flow_logs"].json
}

resource "aws_iam_role_policy" "vpc_flow_log" {
  name   = "write-flow-logs"
  role   = aws_iam_role.vpc_flow_log.id
  policy = data.aws_iam_policy_document.vpc_flow_log.json
}

data "aws_iam_policy_document" "vpc_flow_log" {
  statement {
    actions = [
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogStreams",
    ]
    resources = [
      aws_cloudwatch_log_group.vpc_flow.arn,
      "${aws_cloudwatch_log_group.vpc_flow.arn}:log-stream:*",
    ]
  }
}
