//! Binding arrays as statement parameters: the `unnest` writes and the
//! `= ANY($n)` filters take one array per column instead of one parameter
//! per row, so a statement's text (and its prepared plan) is the same
//! whatever the batch size.

use sea_orm::{
    Value,
    sea_query::{ValueType, postgres_array::NotU8},
};

/// A PostgreSQL array parameter of `items`: `uuid[]` for `Uuid`s, `text[]`
/// for `String`s, `bigint[]` for `i64`s, `real[]` for `f32`s, `jsonb[]`
/// for JSON values and so on (the element type's sea-query array type).
pub(super) fn array<T>(items: impl IntoIterator<Item = T>) -> Value
where
    T: Into<Value> + NotU8 + ValueType,
{
    items.into_iter().collect::<Vec<T>>().into()
}

/// A NULL array parameter of `T`'s element type (for `$n::uuid[] IS NULL`).
pub(super) fn null_array<T>() -> Value
where
    T: Into<Value> + NotU8 + ValueType,
{
    Value::Array(T::array_type(), None)
}

/// Values of a `uuid[]` parameter.
pub(super) fn uuid_array(ids: impl IntoIterator<Item = uuid::Uuid>) -> Value {
    array(ids)
}

/// Values of a `text[]` parameter.
pub(super) fn text_array<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Value {
    array(items.into_iter().map(Into::into))
}

/// Values of a `bigint[]` parameter.
pub(super) fn bigint_array(items: impl IntoIterator<Item = i64>) -> Value {
    array(items)
}

#[cfg(test)]
mod tests {
    use sea_orm::sea_query::ArrayType;

    use super::*;

    #[test]
    fn arrays_carry_their_element_type() {
        let id = uuid::Uuid::nil();
        for (value, element) in [
            (uuid_array([id]), ArrayType::Uuid),
            (text_array(["a"]), ArrayType::String),
            (array([1i32]), ArrayType::Int),
            (bigint_array([1]), ArrayType::BigInt),
            (array([1.0f32]), ArrayType::Float),
            (array([serde_json::json!({})]), ArrayType::Json),
            (null_array::<uuid::Uuid>(), ArrayType::Uuid),
        ] {
            let Value::Array(got, _) = value else { panic!("{value:?} is not an array") };
            assert_eq!(got, element);
        }
        assert_eq!(uuid_array([id]), Value::Array(ArrayType::Uuid, Some(Box::new(vec![Value::Uuid(Some(id))]))));
        assert_eq!(null_array::<uuid::Uuid>(), Value::Array(ArrayType::Uuid, None));
    }
}
