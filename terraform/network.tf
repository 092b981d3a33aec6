# VPC with one public and one private subnet in each of two availability
# zones. Batch instances, SageMaker jobs, databases and the metadata service
# run in the private subnets and reach the internet through NAT.

resource "aws_vpc" "main" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true

  tags = {
    Name = "${local.name}-vpc"
  }
}

# The default security group admits nothing, so an interface launched
# without an explicit security group gets no traffic.
resource "aws_default_security_group" "main" {
  vpc_id = aws_vpc.main.id
}

resource "aws_subnet" "public" {
  count = length(local.azs)

  vpc_id            = aws_vpc.main.id
  availability_zone = local.azs[count.index]
  cidr_block        = cidrsubnet(var.vpc_cidr, 4, count.index)

  # Only the NAT gateways (Elastic IPs) and the load balancer live here,
  # so instances never need an automatic public IP.
  map_public_ip_on_launch = false

  tags = {
    Name = "${local.name}-public-${local.azs[count.index]}"
  }
}

resource "aws_subnet" "private" {
  count = length(local.azs)

  vpc_id            = aws_vpc.main.id
  availability_zone = local.azs[count.index]
  cidr_block        = cidrsubnet(var.vpc_cidr, 4, count.index + length(local.azs))

  tags = {
    Name = "${local.name}-private-${local.azs[count.index]}"
  }
}

resource "aws_internet_gateway" "main" {
  vpc_id = aws_vpc.main.id

  tags = {
    Name = "${local.name}-igw"
  }
}

locals {
  nat_gateway_count = var.single_nat_gateway ? 1 : length(local.azs)
}

resource "aws_eip" "nat" {
  count = local.nat_gateway_count

  domain = "vpc"

  tags = {
    Name = "${local.name}-nat-${count.index}"
  }

  depends_on = [aws_internet_gateway.main]
}

resource "aws_nat_gateway" "main" {
  count = local.nat_gateway_count

  allocation_id = aws_eip.nat[count.index].id
  subnet_id     = aws_subnet.public[count.index].id

  tags = {
    Name = "${local.name}-nat-${count.index}"
  }
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.main.id

  tags = {
    Name = "${local.name}-public"
  }
}

resource "aws_route" "public_internet" {
  route_table_id         = aws_route_table.public.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.main.id
}

resource "aws_route_table_association" "public" {
  count = length(local.azs)

  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public.id
}

resource "aws_route_table" "private" {
  count = length(local.azs)

  vpc_id = aws_vpc.main.id

  tags = {
    Name = "${local.name}-private-${local.azs[count.index]}"
  }
}

resource "aws_route" "private_nat" {
  count = length(local.azs)

  route_table_id         = aws_route_table.private[count.index].id
  destination_cidr_block = "0.0.0.0/0"
  nat_gateway_id         = aws_nat_gateway.main[var.single_nat_gateway ? 0 : count.index].id
}

resource "aws_route_table_association" "private" {
  count = length(local.azs)

  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private[count.index].id
}

# S3 traffic from the private subnets goes through this gateway endpoint
# instead of the NAT gateway, which saves the NAT per-GB processing charge.
resource "aws_vpc_endpoint" "s3" {
  vpc_id            = aws_vpc.main.id
  service_name      = "com.amazonaws.${local.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = concat([aws_route_table.public.id], aws_route_table.private[*].id)

  tags = {
    Name = "${local.name}-s3"
  }
}

resource "aws_flow_log" "vpc" {
  vpc_id               = aws_vpc.main.id
  traffic_type         = "REJECT"
  log_destination_type = "cloud-watch-logs"
  log_destination      = aws_cloudwatch_log_group.vpc_flow.arn
  iam_role_arn         = aws_iam_role.vpc_flow_log.arn
}

resource "aws_cloudwatch_log_group" "vpc_flow" {
  name              = "/${local.name}/vpc-flow-logs"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.main.arn
}

# Security groups of the compute that may reach Aurora. Rules live in
# database.tf and metadata.tf next to the services they open.
resource "aws_security_group" "batch" {
  name        = "${local.name}-batch"
  description = "AWS Batch instances that run Metaflow steps and Optuna workers"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${local.name}-batch"
  }
}

resource "aws_security_group" "sagemaker" {
  #checkov:skip=CKV2_AWS_5:The flow attaches this group at run time through the VpcConfig of its SageMaker training jobs and endpoints.
  name        = "${local.name}-sagemaker"
  description = "SageMaker training jobs and endpoints launched into the VPC"
  vpc_id      = aws_vpc.main.id

  tags = {
    Name = "${local.name}-sagemaker"
  }
}

# Batch and SageMaker need HTTPS to ECR, CloudWatch, Secrets Manager, S3 and
# package indexes, MySQL to Aurora, and the metadata service listener, which
# they reach through the NAT gateway's public address.
locals {
  compute_security_groups = {
    batch     = aws_security_group.batch.id
    sagemaker = aws_security_group.sagemaker.id
  }
}

resource "aws_vpc_security_group_egress_rule" "compute_https" {
  for_each = local.compute_security_groups

  security_group_id = each.value
  description       = "HTTPS to AWS APIs and package indexes"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "compute_aurora" {
  for_each = local.compute_security_groups

  security_group_id            = each.value
  description                  = "MySQL to the Aurora Optuna database"
  ip_protocol                  = "tcp"
  from_port                    = 3306
  to_port                      = 3306
  referenced_security_group_id = aws_security_group.aurora.id
}

resource "aws_vpc_security_group_egress_rule" "compute_metadata" {
  for_each = local.compute_security_groups

  security_group_id = each.value
  description       = "Metaflow metadata service listener on the load balancer"
  ip_protocol       = "tcp"
  from_port         = local.metadata_port
  to_port           = local.metadata_port
  cidr_ipv4         = "0.0.0.0/0"
}
