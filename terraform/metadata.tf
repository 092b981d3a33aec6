# Metaflow metadata service and UI on ECS Fargate behind one load balancer,
# with a PostgreSQL database. Both services run the metaflow_metadata_service
# image: its default command applies database migrations and serves the
# metadata API on port 8080, and the UI backend command serves the API the UI
# needs plus the bundled UI on port 8083.

locals {
  use_https         = var.certificate_arn != null
  listener_protocol = local.use_https ? "HTTPS" : "HTTP"
  url_scheme        = local.use_https ? "https" : "http"
  ui_port           = local.use_https ? 443 : 80
  metadata_port     = local.use_https ? 8443 : 8080

  metadata_db_name     = "metaflow"
  metadata_db_username = "metaflow"
  metadata_secret_arn  = aws_db_instance.metadata.master_user_secret[0].secret_arn

  metaflow_services = {
    metadata = {
      container_port = 8080
      listener_port  = local.metadata_port
      cpu            = 512
      memory         = 1024
      command        = null
    }
    ui = {
      container_port = 8083
      listener_port  = local.ui_port
      cpu            = 1024
      memory         = 4096
      command        = ["/opt/latest/bin/python3", "-m", "services.ui_backend_service.ui_server"]
    }
  }

  # Clients outside AWS connect from allowed_cidrs. Batch and SageMaker reach
  # the public load balancer through the NAT gateways' Elastic IPs.
  load_balancer_ingress = merge(
    {
      for pair in setproduct(keys(local.metaflow_services), var.allowed_cidrs) :
      "${pair[0]}-${pair[1]}" => { service = pair[0], cidr = pair[1] }
    },
    {
      for index, eip in aws_eip.nat :
      "metadata-nat-${index}" => { service = "metadata", cidr = "${eip.public_ip}/32" }
    },
  )
}

# --- PostgreSQL for the metadata service ---

resource "aws_security_group" "metadata_db" {
  name        = "${local.name}-metadata-db"
  description = "PostgreSQL of the Metaflow metadata service, reachable only from its ECS tasks"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${local.name}-metadata-db"
  }
}

resource "aws_vpc_security_group_ingress_rule" "metadata_db_from_services" {
  security_group_id            = aws_security_group.metadata_db.id
  description                  = "PostgreSQL from the metadata service and UI tasks"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = aws_security_group.metaflow_services.id
}

resource "aws_db_parameter_group" "metadata" {
  name        = "${local.name}-metadata-postgres${split(".", var.metadata_db_engine_version)[0]}"
  family      = "postgres${split(".", var.metadata_db_engine_version)[0]}"
  description = "TLS-only connections and DDL and slow-query logging for the metadata database"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_cloudwatch_log_group" "metadata_db" {
  for_each = toset(["postgresql", "upgrade"])

  name              = "/aws/rds/instance/${local.name}-metadata/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

resource "aws_db_instance" "metadata" {
  #checkov:skip=CKV_AWS_157:Multi-AZ is the metadata_db_multi_az variable, off by default because it doubles the instance cost of a service that holds run metadata only.
  identifier     = "${local.name}-metadata"
  engine         = "postgres"
  engine_version = var.metadata_db_engine_version
  instance_class = var.metadata_db_instance_class

  allocated_storage     = 20
  max_allocated_storage = 100
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.main.arn

  db_name                     = local.metadata_db_name
  username                    = local.metadata_db_username
  manage_master_user_password = true

  db_subnet_group_name   = aws_db_subnet_group.private.name
  vpc_security_group_ids = [aws_security_group.metadata_db.id]
  parameter_group_name   = aws_db_parameter_group.metadata.name
  publicly_accessible    = false
  multi_az               = var.metadata_db_multi_az

  iam_database_authentication_enabled = true
  auto_minor_version_upgrade          = true
  deletion_protection                 = var.deletion_protection
  copy_tags_to_snapshot               = true
  backup_retention_period             = var.backup_retention_days
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "${local.name}-metadata-final"
  enabled_cloudwatch_logs_exports     = ["postgresql", "upgrade"]

  performance_insights_enabled    = true
  performance_insights_kms_key_id = aws_kms_key.main.arn
  monitoring_interval             = 60
  monitoring_role_arn             = aws_iam_role.rds_monitoring.arn

  depends_on = [aws_cloudwatch_log_group.metadata_db]
}

# --- Load balancer ---

resource "aws_security_group" "load_balancer" {
  name        = "${local.name}-metaflow-lb"
  description = "Metaflow metadata service and UI load balancer, open to allowed_cidrs and the NAT gateways"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${local.name}-metaflow-lb"
  }
}

resource "aws_vpc_security_group_ingress_rule" "load_balancer" {
  for_each = local.load_balancer_ingress

  security_group_id = aws_security_group.load_balancer.id
  description       = "${each.value.service} listener from ${each.value.cidr}"
  ip_protocol       = "tcp"
  from_port         = local.metaflow_services[each.value.service].listener_port
  to_port           = local.metaflow_services[each.value.service].listener_port
  cidr_ipv4         = each.value.cidr
}

resource "aws_vpc_security_group_egress_rule" "load_balancer_to_services" {
  for_each = local.metaflow_services

  security_group_id            = aws_security_group.load_balancer.id
  description                  = "${each.key} container port"
  ip_protocol                  = "tcp"
  from_port                    = each.value.container_port
  to_port                      = each.value.container_port
  referenced_security_group_id = aws_security_group.metaflow_services.id
}

resource "aws_lb" "metaflow" {
  #checkov:skip=CKV_AWS_91:Load balancer access logs need a second bucket with SSE-S3 because they do not support SSE-KMS; the security group already limits clients to allowed_cidrs.
  #checkov:skip=CKV2_AWS_28:The security group limits clients to allowed_cidrs; a WAF web ACL adds a monthly charge for an internal tool with no public users.
  name                       = "${local.name}-metaflow"
  load_balancer_type         = "application"
  internal                   = false
  subnets                    = aws_subnet.public[*].id
  security_groups            = [aws_security_group.load_balancer.id]
  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection
}

resource "aws_lb_target_group" "metaflow" {
  #checkov:skip=CKV_AWS_378:The load balancer terminates TLS when certificate_arn is set; the hop to the Fargate tasks stays inside the VPC between security groups that admit only each other.
  for_each = local.metaflow_services

  name        = "${local.name}-${each.key}"
  port        = each.value.container_port
  protocol    = "HTTP"
  target_type = "ip"
  vpc_id      = aws_vpc.main.id

  health_check {
    path    = "/ping"
    matcher = "200"
  }
}

resource "aws_lb_listener" "metaflow" {
  for_each = local.metaflow_services

  load_balancer_arn = aws_lb.metaflow.arn
  port              = each.value.listener_port
  protocol          = local.listener_protocol
  ssl_policy        = local.use_https ? "ELBSecurityPolicy-TLS13-1-2-2021-06" : null
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.metaflow[each.key].arn
  }
}

# --- ECS Fargate services ---

resource "aws_security_group" "metaflow_services" {
  name        = "${local.name}-metaflow-services"
  description = "Metaflow metadata service and UI tasks, reachable only from the load balancer"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${local.name}-metaflow-services"
  }
}

resource "aws_vpc_security_group_ingress_rule" "services_from_load_balancer" {
  for_each = local.metaflow_services

  security_group_id            = aws_security_group.metaflow_services.id
  description                  = "${each.key} container port from the load balancer"
  ip_protocol                  = "tcp"
  from_port                    = each.value.container_port
  to_port                      = each.value.container_port
  referenced_security_group_id = aws_security_group.load_balancer.id
}

resource "aws_vpc_security_group_egress_rule" "services_https" {
  security_group_id = aws_security_group.metaflow_services.id
  description       = "HTTPS to the image registry, S3, Secrets Manager and CloudWatch"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "services_postgres" {
  security_group_id            = aws_security_group.metaflow_services.id
  description                  = "PostgreSQL to the metadata database"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = aws_security_group.metadata_db.id
}

resource "aws_ecs_cluster" "metaflow" {
  name = "${local.name}-metaflow"

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_cloudwatch_log_group" "metaflow_services" {
  name              = "/${local.name}/metaflow-services"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

resource "aws_iam_role" "metaflow_services_execution" {
  name               = "${local.name}-metaflow-services-execution"
  assume_role_policy = data.aws_iam_policy_document.assume_role["ecs_tasks"].json
}

resource "aws_iam_role_policy_attachment" "metaflow_services_execution" {
  role       = aws_iam_role.metaflow_services_execution.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

resource "aws_iam_role_policy" "metaflow_services_execution" {
  name   = "read-metadata-db-secret"
  role   = aws_iam_role.metaflow_services_execution.id
  policy = data.aws_iam_policy_document.metaflow_services_execution.json
}

data "aws_iam_policy_document" "metaflow_services_execution" {
  statement {
    sid       = "ReadMetadataDatabaseSecret"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [local.metadata_secret_arn]
  }
}

# The UI backend reads run artifacts from the datastore to show them.
resource "aws_iam_role" "metaflow_services_task" {
  name               = "${local.name}-metaflow-services-task"
  assume_role_policy = data.aws_iam_policy_document.assume_role["ecs_tasks"].json
}

resource "aws_iam_role_policy" "metaflow_services_task" {
  name   = "read-datastore"
  role   = aws_iam_role.metaflow_services_task.id
  policy = data.aws_iam_policy_document.metaflow_services_task.json
}

data "aws_iam_policy_document" "metaflow_services_task" {
  statement {
    sid       = "ListDatastoreBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation"]
    resources = [aws_s3_bucket.datastore.arn]
  }

  statement {
    sid       = "ReadDatastoreObjects"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.datastore.arn}/*"]
  }

  statement {
    sid       = "DecryptDatastoreObjects"
    actions   = ["kms:Decrypt", "kms:DescribeKey"]
    resources = [aws_kms_key.main.arn]
  }
}

resource "aws_ecs_task_definition" "metaflow" {
  for_each = local.metaflow_services

  family                   = "${local.name}-metaflow-${each.key}"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = each.value.cpu
  memory                   = each.value.memory
  execution_role_arn       = aws_iam_role.metaflow_services_execution.arn
  task_role_arn            = aws_iam_role.metaflow_services_task.arn

  container_definitions = jsonencode([
    {
      name      = each.key
      image     = var.metaflow_service_image
      essential = true
      command   = each.value.command

      portMappings = [
        {
          containerPort = each.value.container_port
          protocol      = "tcp"
        },
      ]

      environment = [
        { name = "MF_METADATA_DB_HOST", value = aws_db_instance.metadata.address },
        { name = "MF_METADATA_DB_PORT", value = tostring(aws_db_instance.metadata.port) },
        { name = "MF_METADATA_DB_NAME", value = local.metadata_db_name },
        { name = "MF_METADATA_DB_USER", value = local.metadata_db_username },
        { name = "METAFLOW_DEFAULT_DATASTORE", value = "s3" },
        { name = "METAFLOW_DATASTORE_SYSROOT_S3", value = local.datastore_sysroot },
        { name = "MF_DATASTORE_ROOT", value = local.datastore_sysroot },
      ]

      # ECS reads the "password" key of the RDS-managed secret at task start.
      secrets = [
        { name = "MF_METADATA_DB_PSWD", valueFrom = "${local.metadata_secret_arn}:password::" },
      ]

      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.metaflow_services.name
          awslogs-region        = local.region
          awslogs-stream-prefix = each.key
        }
      }
    },
  ])
}

resource "aws_ecs_service" "metaflow" {
  for_each = local.metaflow_services

  name             = "${local.name}-metaflow-${each.key}"
  cluster          = aws_ecs_cluster.metaflow.id
  task_definition  = aws_ecs_task_definition.metaflow[each.key].arn
  desired_count    = 1
  launch_type      = "FARGATE"
  platform_version = "LATEST"

  network_configuration {
    subnets          = aws_subnet.private[*].id
    security_groups  = [aws_security_group.metaflow_services.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.metaflow[each.key].arn
    container_name   = each.key
    container_port   = each.value.container_port
  }

  depends_on = [aws_lb_listener.metaflow]
}
