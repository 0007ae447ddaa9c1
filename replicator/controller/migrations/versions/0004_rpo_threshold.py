"""a policy's RPO threshold: seconds without a replicated cycle before a machine's health turns Warning

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 14:20:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('protection_policies') as batch:
        batch.add_column(sa.Column('rpo_threshold', sa.Integer(), server_default='3600', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('protection_policies') as batch:
        batch.drop_column('rpo_threshold')
