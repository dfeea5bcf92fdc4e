//! API keys in PostgreSQL: the same table and answers as SQLite's. Instants are the server's.

use super::{backend, PgStore, NOW};
use crate::common::duplicate_name_or;
use crate::record::{ApiKeyRow, KEY_COLUMNS};
use async_trait::async_trait;
use kiln_core::ids::KeyId;
use kiln_core::store::{ApiKey, KeyStore, StoreError};

#[async_trait]
impl KeyStore for PgStore {
    async fn insert_key(
        &self,
        name: &str,
        token_hash: &str,
        prefix: &str,
    ) -> Result<ApiKey, StoreError> {
        let sql = format!(
            "INSERT INTO api_keys (id, name, token_hash, prefix, created_at) \
             VALUES ($1, $2, $3, $4, {NOW}) RETURNING {KEY_COLUMNS}"
        );
        let row: ApiKeyRow = sqlx::query_as(&sql)
            .bind(KeyId::new().to_string())
            .bind(name)
            .bind(token_hash)
            .bind(prefix)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| duplicate_name_or(e, name, backend))?;
        row.into_key()
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, name");
        let rows: Vec<ApiKeyRow> = sqlx::query_as(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.into_iter().map(ApiKeyRow::into_key).collect()
    }

    async fn revoke_key(&self, name: &str) -> Result<ApiKey, StoreError> {
        let sql = format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, {NOW}) WHERE name = $1 \
             RETURNING {KEY_COLUMNS}"
        );
        let row: Option<ApiKeyRow> = sqlx::query_as(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.ok_or_else(|| StoreError::NoSuchKey(name.to_string()))?
            .into_key()
    }

    async fn key_by_hash(&self, token_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE token_hash = $1 AND revoked_at IS NULL"
        );
        let row: Option<ApiKeyRow> = sqlx::query_as(&sql)
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(ApiKeyRow::into_key).transpose()
    }

    async fn key_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        Ok(n as u64)
    }
}
