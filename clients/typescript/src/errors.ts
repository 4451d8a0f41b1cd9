// The rich details of a failed call: the service answers errors with a google.rpc.Status
// whose details hold a google.rpc.ErrorInfo (the reason, such as TIER_REQUIRED) and, for
// invalid input, a google.rpc.BadRequest (one violation per field). @grpc/grpc-js hands
// them over only as the bytes of the `grpc-status-details-bin` trailer; `errorDetails`
// decodes them.
import type { ServiceError } from "@grpc/grpc-js";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";

/** Why a call failed, in words a program can act on (google.rpc.ErrorInfo). */
export interface ErrorInfo {
  /** For example `TIER_REQUIRED`, `ROLE_REQUIRED`, `INVALID_ARGUMENT`. */
  reason: string;
  /** `webhooks.dembrane.com` for the service's own errors. */
  domain: string;
  metadata: Record<string, string>;
}

/** One invalid field of the request (google.rpc.BadRequest.FieldViolation). */
export interface FieldViolation {
  /** The field's path in the request, such as `url` or `events`. */
  field: string;
  description: string;
}

/** What the service said about a failed call. */
export interface ErrorDetails {
  /** The gRPC status code (3 is INVALID_ARGUMENT, 5 NOT_FOUND, 7 PERMISSION_DENIED). */
  code: number;
  message: string;
  /** Absent when the service attached none (a failure in the transport, say). */
  errorInfo?: ErrorInfo;
  /** Empty unless the request was invalid. */
  fieldViolations: FieldViolation[];
}

const STATUS_DETAILS = "grpc-status-details-bin";
const TYPE_PREFIX = "type.googleapis.com/";

/** The details of `error`, or undefined when it carries no google.rpc.Status. */
export function errorDetails(error: ServiceError): ErrorDetails | undefined {
  const [raw] = error.metadata?.get(STATUS_DETAILS) ?? [];
  if (!(raw instanceof Uint8Array)) {
    return undefined;
  }
  const details: ErrorDetails = { code: 0, message: "", fieldViolations: [] };
  fields(raw, (field, reader, wireType) => {
    if (field === 1 && wireType === WireType.Varint) {
      details.code = reader.int32();
    } else if (wireType !== WireType.LengthDelimited) {
      return false;
    } else if (field === 2) {
      details.message = reader.string();
    } else if (field === 3) {
      readDetail(reader.bytes(), details);
    } else {
      return false;
    }
    return true;
  });
  return details;
}

/** Reads a google.protobuf.Any and keeps it when it is a detail this module knows. */
function readDetail(any: Uint8Array, details: ErrorDetails): void {
  let typeUrl = "";
  let value: Uint8Array = new Uint8Array();
  fields(any, (field, reader, wireType) => {
    if (wireType !== WireType.LengthDelimited) {
      return false;
    }
    if (field === 1) {
      typeUrl = reader.string();
    } else if (field === 2) {
      value = reader.bytes();
    } else {
      return false;
    }
    return true;
  });
  const type = typeUrl.startsWith(TYPE_PREFIX) ? typeUrl.slice(TYPE_PREFIX.length) : typeUrl;
  if (type === "google.rpc.ErrorInfo") {
    details.errorInfo = readErrorInfo(value);
  } else if (type === "google.rpc.BadRequest") {
    fields(value, (field, reader, wireType) => {
      if (field !== 1 || wireType !== WireType.LengthDelimited) {
        return false;
      }
      details.fieldViolations.push(readViolation(reader.bytes()));
      return true;
    });
  }
}

function readErrorInfo(bytes: Uint8Array): ErrorInfo {
  const info: ErrorInfo = { reason: "", domain: "", metadata: {} };
  fields(bytes, (field, reader, wireType) => {
    if (wireType !== WireType.LengthDelimited) {
      return false;
    }
    if (field === 1) {
      info.reason = reader.string();
    } else if (field === 2) {
      info.domain = reader.string();
    } else if (field === 3) {
      // A map entry: key 1, value 2.
      const [key, value] = stringPair(reader.bytes());
      info.metadata[key] = value;
    } else {
      return false;
    }
    return true;
  });
  return info;
}

function readViolation(bytes: Uint8Array): FieldViolation {
  const [field, description] = stringPair(bytes);
  return { field, description };
}

/** The string fields 1 and 2 of the message in `bytes` (empty when absent). */
function stringPair(bytes: Uint8Array): [string, string] {
  const pair: [string, string] = ["", ""];
  fields(bytes, (field, reader, wireType) => {
    if (wireType !== WireType.LengthDelimited || (field !== 1 && field !== 2)) {
      return false;
    }
    pair[field - 1] = reader.string();
    return true;
  });
  return pair;
}

/**
 * Calls `read` for each field of the message in `bytes`; a field it does not take (it
 * answers false without reading) is skipped, as protobuf skips unknown fields.
 */
function fields(
  bytes: Uint8Array,
  read: (field: number, reader: BinaryReader, wireType: WireType) => boolean,
): void {
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (!read(field, reader, wireType)) {
      reader.skip(wireType);
    }
  }
}
