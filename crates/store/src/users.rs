//! Users.

use chrono::Utc;

use crate::error::{db, unique_violation};
use crate::{Conn, Store, StoreError, User, commit, from_ms, ms};

#[derive(sqlx::FromRow)]
struct UserRow {
    id: i64,
    name: String,
    created_at: i64,
}

impl TryFrom<UserRow> for User {
    type Error = StoreError;
    fn try_from(r: UserRow) -> Result<User, StoreError> {
        Ok(User {
            id: r.id,
            name: r.name,
            created_at: from_ms("user created_at", r.created_at)?,
        })
    }
}

const COLS: &str = "id, name, created_at";

fn validate_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty()
        || name.len() > 255
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(StoreError::invalid(
            "user name",
            format!("{name:?}: 1-255 characters, no spaces or control characters"),
        ));
    }
    Ok(())
}

pub(crate) async fn user_exists(conn: &mut Conn, id: i64) -> Result<bool, StoreError> {
    let found: Option<i64> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await
        .map_err(db("looking up a user"))?;
    Ok(found.is_some())
}

impl Store {
    /// Creates a user; `Conflict` if the name is taken.
    pub async fn create_user(&self, name: &str) -> Result<User, StoreError> {
        validate_name(name)?;
        let row: UserRow = sqlx::query_as(&format!(
            "INSERT INTO users (name, created_at) VALUES ($1, $2) RETURNING {COLS}"
        ))
        .bind(name)
        .bind(ms(Utc::now()))
        .fetch_one(self.writer())
        .await
        .map_err(|e| match unique_violation(&e) {
            Some(_) => StoreError::conflict("user", format!("user {name:?} already exists")),
            None => db("creating a user")(e),
        })?;
        row.try_into()
    }

    pub async fn list_users(&self) -> Result<Vec<User>, StoreError> {
        let rows: Vec<UserRow> = sqlx::query_as(&format!("SELECT {COLS} FROM users ORDER BY id"))
            .fetch_all(self.reader())
            .await
            .map_err(db("listing users"))?;
        rows.into_iter().map(User::try_from).collect()
    }

    pub async fn get_user(&self, id: i64) -> Result<User, StoreError> {
        let row: Option<UserRow> =
            sqlx::query_as(&format!("SELECT {COLS} FROM users WHERE id = $1"))
                .bind(id)
                .fetch_optional(self.reader())
                .await
                .map_err(db("looking up a user"))?;
        row.ok_or_else(|| StoreError::not_found("user", id))?
            .try_into()
    }

    pub async fn get_user_by_name(&self, name: &str) -> Result<User, StoreError> {
        let row: Option<UserRow> =
            sqlx::query_as(&format!("SELECT {COLS} FROM users WHERE name = $1"))
                .bind(name)
                .fetch_optional(self.reader())
                .await
                .map_err(db("looking up a user"))?;
        row.ok_or_else(|| StoreError::not_found("user", format!("{name:?}")))?
            .try_into()
    }

    /// Deletes a user and their pre-auth keys. Refused (`Conflict`) while the user owns
    /// nodes: deleting a person must not silently take machines off the tailnet; the admin
    /// deletes (or re-tags) those nodes first.
    pub async fn delete_user(&self, name: &str) -> Result<User, StoreError> {
        let mut tx = self.begin_write().await?;
        let row: Option<UserRow> =
            sqlx::query_as(&format!("SELECT {COLS} FROM users WHERE name = $1"))
                .bind(name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db("looking up a user"))?;
        let user: User = row
            .ok_or_else(|| StoreError::not_found("user", format!("{name:?}")))?
            .try_into()?;
        let nodes: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nodes WHERE user_id = $1")
            .bind(user.id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("counting a user's nodes"))?;
        if nodes > 0 {
            return Err(StoreError::conflict(
                "user",
                format!(
                    "user {name:?} still owns {nodes} node(s); delete them or move them to tags \
                     first"
                ),
            ));
        }
        // Their pre-auth keys go with them (ON DELETE CASCADE).
        sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(user.id)
            .execute(&mut *tx)
            .await
            .map_err(db("deleting a user"))?;
        commit(tx).await?;
        Ok(user)
    }
}
