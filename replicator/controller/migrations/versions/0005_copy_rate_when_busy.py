"""a policy's copy_rate_when_busy: bytes/s of an initial copy or resync while the guest writes (0: full speed)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 19:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('protection_policies') as batch:
        batch.add_column(sa.Column('copy_rate_when_busy', sa.BigInteger(), server_default='52428800', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('protection_policies') as batch:
        batch.drop_column('copy_rate_when_busy')
